//! `/logging` on an admin endpoint: reading and replacing a process's log filter at runtime, as Envoy's `POST
//! /logging?level=`. The filter belongs to the binary's `tracing` subscriber, which a library does not own, so
//! the binary hands the admin endpoint a [`LogFilter`]; [`answer`] is what every admin endpoint of the mesh
//! (a library's, mesh-control's) says to a request.

use std::sync::Arc;

/// Reads (`None`) or replaces (`Some(directives)`, `RUST_LOG` syntax) the process's log filter, returning the
/// filter now in force, or why the new one was refused.
pub type LogFilter = Arc<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

/// The status and text answering `method /logging?query`: `GET` shows the filter; `POST ?level=<level>`
/// (every target) or `POST ?filter=<directives>` replaces it. An invalid filter is a 400 with the reason, and
/// changes nothing; a process that exposes no filter (`None`) answers 404.
pub fn answer(filter: Option<&LogFilter>, method: &str, query: Option<&str>) -> (u16, String) {
    let Some(filter) = filter else {
        return (404, "this process does not expose its log filter\n".to_owned());
    };
    let asked = query.unwrap_or_default().split('&').find_map(|pair| match pair.split_once('=') {
        Some(("level" | "filter", value)) => Some(percent_decode(value)),
        _ => None,
    });
    let result = match (method, asked) {
        ("GET", None) => filter(None),
        ("POST", Some(new)) => filter(Some(&new)),
        ("POST", None) => Err("POST /logging needs ?level=<level> or ?filter=<directives>".to_owned()),
        _ => Err("use GET /logging to read the filter, POST /logging?level=... to change it".to_owned()),
    };
    match result {
        Ok(now) => (200, format!("{now}\n")),
        Err(reason) => (400, format!("{reason}\n")),
    }
}

/// A query value with `+` as a space and `%XX` escapes decoded (an invalid escape is kept as it is).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, byte) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A filter that accepts anything without `!`, as a subscriber's parser would refuse some.
    fn filter() -> (LogFilter, Arc<Mutex<String>>) {
        let now = Arc::new(Mutex::new("info".to_owned()));
        let kept = now.clone();
        let filter: LogFilter = Arc::new(move |new: Option<&str>| {
            let mut now = kept.lock().unwrap();
            if let Some(new) = new {
                if new.contains('!') {
                    return Err(format!("invalid log filter {new:?}"));
                }
                *now = new.to_owned();
            }
            Ok(now.clone())
        });
        (filter, now)
    }

    #[test]
    fn logging_requests_read_replace_and_refuse_without_changing_the_filter() {
        let (f, now) = filter();
        assert_eq!(answer(Some(&f), "GET", None), (200, "info\n".to_owned()));
        assert_eq!(answer(Some(&f), "POST", Some("level=debug")), (200, "debug\n".to_owned()));
        assert_eq!(answer(Some(&f), "POST", Some("x=1&filter=mesh_tower%3Dtrace%2Cwarn")).1, "mesh_tower=trace,warn\n");
        let (status, reason) = answer(Some(&f), "POST", Some("filter=bad!"));
        assert_eq!(status, 400, "{reason}");
        assert_eq!(*now.lock().unwrap(), "mesh_tower=trace,warn", "a refused filter changes nothing");
        assert_eq!(answer(Some(&f), "POST", None).0, 400);
        assert_eq!(answer(Some(&f), "DELETE", None).0, 400);
        assert_eq!(answer(None, "GET", None).0, 404);
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("a%2Cb+c%zz%4"), "a,b c%zz%4");
    }
}
