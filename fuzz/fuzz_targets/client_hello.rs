//! The TLS ClientHello reader of the egress proxy (`cove_net::egress::hello`): the host reads
//! it from a guest's connection to decide where the connection may go. Checks: no panic; every
//! byte read is kept for the replay; the SNI is lowercased without a trailing dot; the same
//! answer however the segments were cut.
#![no_main]

use cove_net::egress::hello::{Hello, HelloParser, MAX_HELLO};
use libfuzzer_sys::fuzz_target;

/// Pushes `pieces` until the parser answers: the hello and how many bytes were pushed.
fn parse(pieces: &[&[u8]]) -> Option<(Hello, usize)> {
    let mut parser = HelloParser::default();
    let mut fed = 0;
    for piece in pieces {
        fed += piece.len();
        match parser.push(piece) {
            Ok(None) => {}
            Ok(Some(hello)) => return Some((hello, fed)),
            Err(_) => {
                return None;
            }
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let (pieces, stream) = cove_fuzz::split(data);
    let split = parse(&pieces);
    if let Some((hello, fed)) = &split {
        assert_eq!(hello.recorded, stream[..*fed], "the replay differs from what was read");
        assert!(hello.recorded.len() <= MAX_HELLO);
        if let Some(sni) = &hello.sni {
            assert_eq!(*sni, sni.to_ascii_lowercase());
            assert!(!sni.ends_with('.'));
        }
    }
    if let (Some((a, _)), Some((b, _))) = (&split, parse(&[stream])) {
        assert_eq!((&a.sni, &a.alpn), (&b.sni, &b.alpn), "the hello depends on how it was cut");
    }
});
