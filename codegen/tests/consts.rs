//! `cuda/vp_consts.cuh` is generated from `codegen/src/consts.rs` and the family declarations;
//! this test fails when the checked-in file is stale (`VPMOE_BLESS=1` rewrites it).

#[test]
fn the_generated_constants_header_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/vp_consts.cuh");
    let want = vpmoe_codegen::consts::header();
    if std::env::var_os("VPMOE_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(have == want, "{} is stale: run `VPMOE_BLESS=1 cargo test -p vpmoe-codegen --test consts`", path.display());
}

/// Every family is declared once, and its template file is one of the embedded headers.
#[test]
fn families_are_unique_and_have_headers() {
    let mut seen = std::collections::BTreeSet::new();
    for f in vpmoe_codegen::families() {
        assert!(seen.insert(f.name), "family {} declared twice", f.name);
        assert!(
            vpmoe_codegen::headers::HEADERS.iter().any(|(n, _)| *n == f.header),
            "{}: no header {}",
            f.name,
            f.header
        );
    }
}
