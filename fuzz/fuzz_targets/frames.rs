//! The fs wire frames of a mount's virtio-serial port (`cove_proto::fs`): the host decodes what
//! the guest sends. Checks: no panic; the same frames however the stream was cut; a request
//! that decodes encodes back to the same frame.
#![no_main]

use cove_proto::fs::{decode, encode, Frame, Reply, Request};
use libfuzzer_sys::fuzz_target;

/// Feeds `pieces` as a reader would and decodes until the stream is desynchronised:
/// the frames, whether it ended in an error, and the bytes left over.
fn decode_all(pieces: &[&[u8]]) -> (Vec<Frame>, bool, usize) {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => return (frames, true, buf.len()),
            }
        }
    }
    (frames, false, buf.len())
}

fuzz_target!(|data: &[u8]| {
    let (pieces, stream) = cove_fuzz::split(data);
    let (frames, failed, left) = decode_all(&pieces);
    let (whole, whole_failed, whole_left) = decode_all(&[stream]);
    assert_eq!(frames, whole, "frames depend on how the stream was cut");
    assert_eq!(failed, whole_failed);
    if !failed {
        assert_eq!(left, whole_left);
    }
    for (header, payload) in &frames {
        if let Ok(request) = serde_json::from_slice::<Request>(header) {
            let mut again = encode(&request, payload);
            let (h, d) = decode(&mut again).expect("a re-encoded frame decodes").expect("whole");
            let back: Request = serde_json::from_slice(&h).expect("a re-encoded header parses");
            assert_eq!((back.id, back.op, &back.path, &d), (request.id, request.op, &request.path, payload));
        }
        let _ = serde_json::from_slice::<Reply>(header);
    }
    if let Ok(text) = std::str::from_utf8(stream) {
        for magic in [cove_proto::HELLO, cove_proto::READY, cove_proto::PARK, cove_proto::PARKED] {
            if let Some((_, nonce)) = cove_proto::parse_handshake(text, magic) {
                assert!(!nonce.contains(' '));
            }
        }
    }
});
