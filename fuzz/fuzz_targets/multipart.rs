//! The agent's `write-files` upload parser (multer and the part-name rules), which reads what
//! the host forwards from API clients. Checks: no panic; a refusal is a 400 or a 413, never a
//! 5xx; the same parts however the body was cut and whenever its pieces arrived; every part is
//! named.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (pieces, stream) = cove_fuzz::split(data);
    // Mostly a fixed boundary; an input starting with "multipart/" brings its own header line.
    let (content_type, pieces, stream) = match stream.strip_prefix(b"multipart/") {
        Some(_) => {
            let end = stream.iter().position(|&b| b == b'\n').unwrap_or(stream.len());
            let Ok(header) = std::str::from_utf8(&stream[..end]) else { return };
            let body = &stream[(end + 1).min(stream.len())..];
            (header.to_string(), vec![body], body)
        }
        None => ("multipart/form-data; boundary=XyZ".to_string(), pieces, stream),
    };
    // Which of the parser's first looks at the body find its next piece not there yet: from the
    // seed byte too.
    let waits = data.first().map_or(0, |&seed| u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let pieces = pieces.iter().map(|p| p.to_vec()).collect();
    let split = cove_agent::fuzzing::write_files(&content_type, pieces, waits);
    let whole = cove_agent::fuzzing::write_files(&content_type, vec![stream.to_vec()], 0);
    match &split {
        Ok(parts) => {
            assert!(!parts.is_empty());
            assert!(parts.iter().all(|(name, _)| !name.is_empty()));
        }
        Err(status) => assert!(matches!(status, 400 | 413), "answered {status}"),
    }
    assert_eq!(split, whole, "the upload depends on how its body was cut or when it arrived");
});
