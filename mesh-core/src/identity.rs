//! Workload identities: SPIFFE IDs (`spiffe://<trust-domain>/<path>`), checked against the SPIFFE ID
//! specification once, where they enter the process.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::Error;

/// The longest SPIFFE ID the specification allows, in bytes.
const MAX_LEN: usize = 2048;

/// A valid SPIFFE ID: a lower-case trust domain and a path of non-empty segments without `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<str>);

impl SpiffeId {
    /// Checks `id` against the SPIFFE ID specification.
    pub fn parse(id: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidIdentity { id: id.to_owned(), reason };
        if id.len() > MAX_LEN {
            return Err(invalid(format!("longer than {MAX_LEN} bytes")));
        }
        let Some(rest) = id.strip_prefix("spiffe://") else {
            return Err(invalid("does not start with spiffe://".into()));
        };
        let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if domain.is_empty() {
            return Err(invalid("the trust domain is empty".into()));
        }
        if let Some(bad) = domain.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))) {
            return Err(invalid(format!("the trust domain holds {bad:?} (only a-z, 0-9, '.', '-' and '_')")));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(invalid("the path has an empty segment (// or a trailing /)".into())),
                    "." | ".." => return Err(invalid(format!("the path has a {segment:?} segment"))),
                    _ => {}
                }
                if let Some(bad) = segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))) {
                    return Err(invalid(format!("the path holds {bad:?} (only letters, digits, '.', '-' and '_')")));
                }
            }
        }
        Ok(Self(id.into()))
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain (`mesh.example` in `spiffe://mesh.example/ns/a/sa/b`).
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        &rest[..rest.find('/').unwrap_or(rest.len())]
    }

    /// The path, with its leading `/` (empty for the trust domain's own ID).
    pub fn path(&self) -> &str {
        &self.0["spiffe://".len() + self.trust_domain().len()..]
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_id_has_its_trust_domain_and_path() {
        let id = SpiffeId::parse("spiffe://mesh.example/ns/prod/sa/greeter").unwrap();
        assert_eq!(id.trust_domain(), "mesh.example");
        assert_eq!(id.path(), "/ns/prod/sa/greeter");
        let domain = SpiffeId::parse("spiffe://mesh.example").unwrap();
        assert_eq!((domain.trust_domain(), domain.path()), ("mesh.example", ""));
    }

    #[test]
    fn ids_outside_the_specification_are_refused_with_the_reason() {
        for (id, reason) in [
            ("http://mesh.example/a", "spiffe://"),
            ("spiffe:///a", "trust domain is empty"),
            ("spiffe://Mesh.example/a", "'M'"),
            ("spiffe://mesh.example/a//b", "empty segment"),
            ("spiffe://mesh.example/a/", "empty segment"),
            ("spiffe://mesh.example/a/../b", "\"..\""),
            ("spiffe://mesh.example/a b", "' '"),
            ("spiffe://mesh.example/a?b", "'?'"),
        ] {
            let error = SpiffeId::parse(id).unwrap_err().to_string();
            assert!(error.contains(reason) && error.contains(id), "{id}: {error}");
        }
        assert!(SpiffeId::parse(&format!("spiffe://a/{}", "b".repeat(MAX_LEN))).is_err());
    }
}
