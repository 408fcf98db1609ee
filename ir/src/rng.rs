//! SplitMix64, the one deterministic generator of the project: parameter initialisation,
//! synthetic inputs, the data order and the tests' random inputs. The same seed and name give the
//! same numbers on every machine and thread count.

pub struct Rng(u64);

const GAMMA: u64 = 0x9e3779b97f4a7c15;

/// The SplitMix64 output for counter `z` (advanced by one step): a keyed hash of `z`.
pub fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// A stream derived from a seed and a name (e.g. a parameter's name).
    pub fn for_name(seed: u64, name: &str) -> Self {
        let mut h = 0xcbf29ce484222325u64 ^ seed; // FNV-1a over the name, keyed by the seed
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        Rng(h)
    }
    /// The same stream `draws` values further on (SplitMix64 is a counter: no values are made).
    pub fn skipped(&self, draws: u64) -> Self {
        Rng(self.0.wrapping_add(draws.wrapping_mul(GAMMA)))
    }
    pub fn next_u64(&mut self) -> u64 {
        let z = splitmix64(self.0);
        self.0 = self.0.wrapping_add(GAMMA);
        z
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
