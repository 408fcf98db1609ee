//! placeholder until the NVTX module lands
pub struct Range;
pub fn range(_name: &str) -> Range {
    Range
}
