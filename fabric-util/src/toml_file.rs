//! Strict TOML configuration files: read a file into a serde type in one step, with
//! errors that name the file (and, through the TOML parser, the key and line).
//!
//! The types themselves carry `#[serde(deny_unknown_fields)]`; each daemon then runs
//! its own `validate` step. This module only does what every daemon did the same
//! way: read, parse, name the file, and word a refused value ([`InvalidKey`]).

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

/// A value the TOML parser accepted but the daemon's `validate` step did not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: key `{key}`: expected {expected}")]
pub struct InvalidKey {
    /// The file (or what stands for it, e.g. `<control>` for the control API).
    pub path: String,
    /// The key as a dotted path, e.g. `network[1].port[0].ifname` or `disk[1].size`.
    pub key: String,
    /// What a valid value looks like.
    pub expected: String,
}

impl InvalidKey {
    /// The refused value of `key` in the file `path`, and what a valid one looks like.
    pub fn new(path: impl ToString, key: impl Into<String>, expected: impl Into<String>) -> Self {
        InvalidKey {
            path: path.to_string(),
            key: key.into(),
            expected: expected.into(),
        }
    }
}

/// A config problem: the file itself, or one of its values.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// the file could not be read or is not the TOML of a config
    #[error(transparent)]
    File(#[from] TomlFileError),
    /// a value the file's parser accepted but validation refused
    #[error(transparent)]
    Invalid(#[from] InvalidKey),
}

impl ConfigError {
    /// A refused value: see [`InvalidKey::new`].
    pub fn invalid(
        path: impl ToString,
        key: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        InvalidKey::new(path, key, expected).into()
    }
}

/// The text of `path`.
fn read_text(path: &Path) -> Result<String, TomlFileError> {
    std::fs::read_to_string(path).map_err(|source| TomlFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and parses `path`.
pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TomlFileError> {
    let text = read_text(path)?;
    parse(&text, path)
}

/// Parses TOML `text`; `path` only names the file in errors.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, TomlFileError> {
    toml::from_str(text).map_err(|e| TomlFileError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Reads `path` as one TOML table into `T`, first setting each key of `set` that
/// the file leaves out (a value the command line gives, e.g. a name). A key the
/// file has with another value is an error naming the file and the key.
pub fn read_table_with<T: serde::de::DeserializeOwned>(
    path: &Path,
    set: &[(&str, &str)],
) -> Result<T, ConfigError> {
    let text = read_text(path)?;
    let mut table: toml::Table = parse(&text, path)?;
    for (k, v) in set {
        match table.get(*k) {
            None => {
                table.insert(k.to_string(), toml::Value::String(v.to_string()));
            }
            Some(toml::Value::String(s)) if s == v => {}
            Some(other) => {
                return Err(ConfigError::invalid(
                    path.display(),
                    *k,
                    format!("{v:?}, as on the command line (the file has {other})"),
                ))
            }
        }
    }
    Ok(
        T::deserialize(toml::Value::Table(table)).map_err(|e| TomlFileError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?,
    )
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
        let e = InvalidKey {
            path: "/etc/x.toml".into(),
            key: "disk[1].size".into(),
            expected: "a size".into(),
        };
        assert_eq!(
            e.to_string(),
            "/etc/x.toml: key `disk[1].size`: expected a size"
        );
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Named {
        name: String,
        #[serde(default)]
        n: Option<u32>,
    }

    #[test]
    fn a_table_file_gets_the_command_lines_keys_and_names_its_own_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, "n = 3\n").unwrap();
        let t: Named = read_table_with(&p, &[("name", "lab")]).unwrap();
        assert_eq!((t.name.as_str(), t.n), ("lab", Some(3)));
        std::fs::write(&p, "name = \"other\"\n").unwrap();
        let e = read_table_with::<Named>(&p, &[("name", "lab")]).unwrap_err();
        assert!(e.to_string().contains("key `name`"), "{e}");
        std::fs::write(&p, "nn = 3\n").unwrap();
        let e = read_table_with::<Named>(&p, &[("name", "lab")]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("nn"),
            "{e}"
        );
        std::fs::write(&p, "n = \"three\"\n").unwrap();
        let e = read_table_with::<Named>(&p, &[("name", "lab")]).unwrap_err();
        assert!(e.to_string().contains("in `n`"), "{e}");
    }
}
