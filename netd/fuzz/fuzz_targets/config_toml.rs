//! Fuzzes the config file path: any text through the TOML parser and then
//! `Config::validate` must never panic, and every refusal must name the file (the
//! operator's only clue which file is wrong). A config that validates must
//! validate again from its own spec (no value the checks accept becomes one they
//! refuse when the same network is added at run time through the control API).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use netd::config::Config;
use netd::error_chain;

const PATH: &str = "/etc/netd/fuzz-netd.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new(PATH);
    let cfg = match Config::parse(text, path) {
        Ok(c) => c,
        Err(e) => {
            let msg = error_chain(&e);
            assert!(msg.contains(PATH), "parse error without the file: {msg}");
            return;
        }
    };
    match cfg.validate(path) {
        Ok(specs) => {
            assert_eq!(specs.len(), cfg.network.len());
            for (i, n) in cfg.network.iter().enumerate() {
                n.validate_at("<control>", &format!("network[{i}]"))
                    .expect("a network valid in the file is valid alone");
            }
        }
        Err(e) => {
            let msg = error_chain(&e);
            assert!(
                msg.contains(PATH),
                "validation error without the file: {msg}"
            );
        }
    }
});
