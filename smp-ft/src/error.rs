//! Turning an error and its sources into the one line an operator reads.

/// `outer: inner: innermost`, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let next = inner.to_string();
        // `#[error(transparent)]` and "{source}" messages repeat their source: say it once.
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the console")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chains_sources_once() {
        let e = Outer(std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"));
        assert_eq!(error_chain(&e), "cannot open the console: no such directory");
    }
}
