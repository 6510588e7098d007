//! Entry points for the fuzz targets in `fuzz/`: the agent's parsers of what the host sends,
//! run in memory (no guest, nothing written to disk).

use bytes::Bytes;

/// Parses a `write-files` upload as the agent does, its body arriving in `chunks`: each part's
/// path and bytes, or the HTTP status the agent would answer with.
pub fn write_files(content_type: &str, chunks: Vec<Vec<u8>>) -> Result<Vec<(String, Vec<u8>)>, u16> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime");
    let body = futures::stream::iter(chunks.into_iter().map(|c| Ok::<_, std::io::Error>(Bytes::from(c))));
    runtime.block_on(crate::fs::read_upload(content_type, body)).map_err(|s| s.as_u16())
}

#[cfg(test)]
mod tests {
    use super::write_files;

    const TYPE: &str = "multipart/form-data; boundary=XyZ";
    const BODY: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"/tmp/a\"\r\n\r\nhello\r\n\
        --XyZ\r\nContent-Disposition: form-data; name*=utf-8''%2Ftmp%2Fb%20c\r\n\r\n\x00\r\n\x01\r\n--XyZ--\r\n";
    const END: &[u8] = b"--XyZ--\r\n";

    #[test]
    fn an_upload_reads_the_same_however_its_body_is_cut() {
        let whole = write_files(TYPE, vec![BODY.to_vec()]).expect("a well-formed upload");
        let expected = vec![
            ("/tmp/a".to_string(), b"hello".to_vec()),
            ("/tmp/b c".to_string(), b"\x00\r\n\x01".to_vec()),
        ];
        assert_eq!(whole, expected);
        for cut in 1..BODY.len() {
            let pieces = vec![BODY[..cut].to_vec(), BODY[cut..].to_vec()];
            assert_eq!(write_files(TYPE, pieces).as_ref(), Ok(&expected), "cut at {cut}");
        }
        let bytes = BODY.iter().map(|&b| vec![b]).collect();
        assert_eq!(write_files(TYPE, bytes), Ok(expected));
    }

    #[test]
    fn an_upload_cut_short_is_a_400() {
        for end in 0..BODY.len() - END.len() {
            assert_eq!(write_files(TYPE, vec![BODY[..end].to_vec()]), Err(400), "cut at {end}");
        }
        assert_eq!(write_files("multipart/form-data", vec![BODY.to_vec()]), Err(400));
    }

    /// A large part full of near-boundaries (`\r\n--Xy` and shorter), cut at random places as
    /// HTTP/2 frames cut a body: every cut gives the same bytes back (the write-files loss of
    /// docs/status.md looked like a part ended early).
    #[test]
    fn near_boundaries_across_random_cuts_lose_nothing() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let traps: [&[u8]; 6] = [b"\r", b"\r\n", b"\r\n-", b"\r\n--", b"\r\n--X", b"\r\n--Xy"];
        let mut data = Vec::new();
        while data.len() < 2 << 20 {
            match next() % 4 {
                0 => data.extend_from_slice(traps[(next() % 6) as usize]),
                _ => data.extend_from_slice(&next().to_le_bytes()),
            }
        }
        // A random run can complete a trap into the real delimiter: break those.
        let delimiter = b"\r\n--XyZ";
        while let Some(i) = data.windows(delimiter.len()).position(|w| w == delimiter) {
            data[i + delimiter.len() - 1] = b'_';
        }
        let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"/tmp/big\"\r\n\r\n".to_vec();
        body.extend_from_slice(&data);
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        for _ in 0..8 {
            let mut pieces = Vec::new();
            let mut rest = body.as_slice();
            while !rest.is_empty() {
                let n = (1 + next() % 20_000) as usize;
                let (piece, tail) = rest.split_at(n.min(rest.len()));
                pieces.push(piece.to_vec());
                rest = tail;
            }
            let parts = write_files(TYPE, pieces).expect("the upload parses");
            assert_eq!(parts.len(), 1);
            assert!(parts[0].1 == data, "the part's bytes differ");
        }
    }
}
