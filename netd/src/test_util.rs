//! What the unit tests of several modules share: deterministic randomness and
//! the config file's checks.

/// A deterministic xorshift64 generator seeded with `seed` (not zero), for
/// randomized robustness tests that must replay the same inputs on every run.
pub fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// The networks of the config file `text` (read as `t.toml`), validated as netd
/// validates its file.
pub fn validate_config(
    text: &str,
) -> Result<Vec<crate::config::NetworkSpec>, crate::config::ConfigError> {
    let path = std::path::Path::new("t.toml");
    crate::config::Config::parse(text, path)?.validate(path)
}
