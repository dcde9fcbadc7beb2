//! Where a service's database is: a `sqlite://` or `postgres://` URL, parsed once at
//! start so an unknown scheme is refused before anything opens, and redacted wherever
//! it is printed (a Postgres URL may carry a password).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Which engine a [`DatabaseUrl`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// A file on the local disk; one process per file.
    Sqlite,
    /// A PostgreSQL server; any number of replicas.
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// A database location. `Debug` and `Display` never show a password.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite:///absolute/path` (or `sqlite://relative/path`).
    Sqlite(PathBuf),
    /// `postgres://` or `postgresql://`, kept whole for the driver.
    Postgres(String),
}

/// Why a database URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("unsupported database URL scheme `{0}`: use sqlite:// or postgres://")]
    UnknownScheme(String),
    #[error("database URL `{0}` has no scheme: use sqlite:///path or postgres://host/db")]
    NoScheme(String),
    #[error("sqlite:// URL without a file path")]
    NoPath,
}

impl DatabaseUrl {
    /// The SQLite file at `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Self::Sqlite(path.into())
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }

    /// The SQLite file, if this is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(p) => Some(p),
            Self::Postgres(_) => None,
        }
    }

    /// The URL as the driver needs it, password included. Only for connecting.
    pub fn expose(&self) -> String {
        match self {
            Self::Sqlite(p) => format!("sqlite://{}", p.display()),
            Self::Postgres(url) => url.clone(),
        }
    }

    /// The URL with any password replaced by `***`: safe for logs and errors.
    pub fn redacted(&self) -> String {
        match self {
            Self::Sqlite(p) => format!("sqlite://{}", p.display()),
            Self::Postgres(url) => redact(url),
        }
    }
}

/// `scheme://user:secret@host…` → `scheme://user:***@host…`; also a `password=`
/// query parameter.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let (authority, tail) = rest
        .find(['/', '?'])
        .map_or((rest, ""), |i| rest.split_at(i));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl FromStr for DatabaseUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(UrlError::NoScheme(redact(s)));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => {
                let path = rest.strip_prefix("//").unwrap_or(rest);
                // Options belong to kiln, not to the URL: drop none silently.
                if path.is_empty() || path.contains('?') {
                    return Err(UrlError::NoPath);
                }
                Ok(Self::Sqlite(PathBuf::from(path)))
            }
            "postgres" | "postgresql" => Ok(Self::Postgres(s.to_string())),
            other => Err(UrlError::UnknownScheme(other.to_string())),
        }
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl serde::Serialize for DatabaseUrl {
    /// Serialized redacted: configs are printed (`kiln config show`), and a password
    /// belongs in the environment or a file, not in what is shown.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> serde::Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_parsed_and_unknown_ones_refused_by_name() {
        let url: DatabaseUrl = "sqlite:///var/lib/kiln/auth/auth.db".parse().unwrap();
        assert_eq!(
            url.sqlite_path(),
            Some(Path::new("/var/lib/kiln/auth/auth.db"))
        );
        let url: DatabaseUrl = "postgres://kiln@db:5432/kiln".parse().unwrap();
        assert_eq!(url.backend(), Backend::Postgres);
        let url: DatabaseUrl = "postgresql://db/kiln".parse().unwrap();
        assert_eq!(url.backend(), Backend::Postgres);
        let err = "mysql://db/kiln".parse::<DatabaseUrl>().unwrap_err();
        assert!(err.to_string().contains("`mysql`"), "{err}");
        assert!("no-scheme".parse::<DatabaseUrl>().is_err());
        assert_eq!("sqlite://".parse::<DatabaseUrl>(), Err(UrlError::NoPath));
    }

    #[test]
    fn passwords_never_show() {
        let url: DatabaseUrl =
            "postgres://kiln:s3cret@db:5432/kiln?sslmode=require&password=s3cret"
                .parse()
                .unwrap();
        for shown in [
            format!("{url}"),
            format!("{url:?}"),
            url.redacted(),
            serde_json::to_string(&url).unwrap(),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("kiln:***@db:5432/kiln"), "{shown}");
        }
        assert!(url.expose().contains("s3cret"));
        let err = "mysql://root:s3cret@db".parse::<DatabaseUrl>().unwrap_err();
        assert!(!err.to_string().contains("s3cret"));
        let err = "root:s3cret@db".parse::<DatabaseUrl>().unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
