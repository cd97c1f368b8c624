//! Strict TOML configuration files: read a file into a serde type in one step, with
//! errors that name the file (and, through the TOML parser, the key and line).
//!
//! The types themselves carry `#[serde(deny_unknown_fields)]`; each daemon then runs
//! its own `validate` step. This module only does what every daemon did the same
//! way: read, parse, name the file.

use std::path::{Path, PathBuf};

/// Why a config file could not be read into its type.
#[derive(Debug, thiserror::Error)]
pub enum TomlFileError {
    /// cannot read config file {path}
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// config file {path}: {message}
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message (it names the key and its line).
        message: String,
    },
}

/// Reads and parses `path`.
pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TomlFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TomlFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses TOML `text`; `path` only names the file in errors.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, TomlFileError> {
    toml::from_str(text).map_err(|e| TomlFileError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        #[allow(dead_code)]
        a: u32,
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let e = parse::<T>("a = 1\nb = 2\n", Path::new("/etc/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config file /etc/x.toml: "), "{e}");
        assert!(e.contains('b') && !e.ends_with('\n'), "{e}");
        let e = read::<T>(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.toml"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
