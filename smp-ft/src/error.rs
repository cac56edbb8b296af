//! Turning an error and its sources into the one line an operator reads.

/// `outer: inner: innermost`, one line (shared with the VMM and the disk mirror).
pub use block::error_chain;

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
