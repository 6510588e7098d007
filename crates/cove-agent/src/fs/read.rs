//! Which bytes of a file a read returns: whole, a byte range, or the first or last lines.

use super::*;

pub(super) enum ReadPlan {
    /// Stream `file` from its current position, up to `len` bytes.
    Stream {
        file: File,
        len: Option<u64>,
    },
    Bytes(Vec<u8>),
}

pub(super) fn plan_read(path: &Path, r: &ReadFileRequest) -> Res<ReadPlan> {
    let mut file = File::open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    if meta.is_dir() {
        return Err(Fail::io(path, is_a_directory()));
    }
    if let Some(n) = r.head {
        // A device without an end (/dev/zero) is only scanned so far.
        let scan = if meta.is_file() { u64::MAX } else { MAX_UNSIZED_READ };
        let end = head_end(&mut (&mut file).take(scan), n).at(path)?;
        file.seek(SeekFrom::Start(0)).at(path)?;
        return Ok(ReadPlan::Stream { file, len: Some(end) });
    }
    if let Some(n) = r.tail {
        if meta.is_file() && meta.len() > 0 {
            let start = tail_start(&mut file, meta.len(), n).at(path)?;
            file.seek(SeekFrom::Start(start)).at(path)?;
            return Ok(ReadPlan::Stream { file, len: Some(meta.len() - start) });
        }
        // No size to seek back from (procfs, devices): read it, bounded, and cut in memory.
        let mut data = Vec::new();
        (&mut file).take(MAX_UNSIZED_READ).read_to_end(&mut data).at(path)?;
        let start = tail_start(&mut io::Cursor::new(&data), data.len() as u64, n).at(path)?;
        data.drain(..usize::try_from(start).unwrap_or(data.len()));
        return Ok(ReadPlan::Bytes(data));
    }
    if let Some(offset) = r.offset.filter(|o| *o > 0) {
        file.seek(SeekFrom::Start(offset)).at(path)?;
    }
    Ok(ReadPlan::Stream { file, len: r.limit })
}

/// Length of the first `n` lines of `r` (each with its newline; the last may lack one).
pub(super) fn head_end(r: &mut impl Read, n: u64) -> io::Result<u64> {
    if n == 0 {
        return Ok(0);
    }
    let mut buf = vec![0u8; CHUNK];
    let mut seen = 0u64;
    let mut pos = 0u64;
    loop {
        let got = match r.read(&mut buf) {
            Ok(0) => return Ok(pos),
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for (i, b) in buf.iter().take(got).enumerate() {
            if *b == b'\n' {
                seen += 1;
                if seen == n {
                    return Ok(pos + i as u64 + 1);
                }
            }
        }
        pos += got as u64;
    }
}

/// Offset where the last `n` lines of a `len`-byte file begin. A final newline ends the last
/// line; it does not start an empty one.
pub(super) fn tail_start<R: Read + Seek>(r: &mut R, len: u64, n: u64) -> io::Result<u64> {
    if n == 0 {
        return Ok(len);
    }
    let mut end = len;
    if len > 0 {
        let mut last = [0u8; 1];
        r.seek(SeekFrom::Start(len - 1))?;
        r.read_exact(&mut last)?;
        if last[0] == b'\n' {
            end -= 1;
        }
    }
    let mut buf = vec![0u8; CHUNK];
    let mut remaining = n;
    let mut pos = end;
    while pos > 0 {
        let size = (CHUNK as u64).min(pos);
        pos -= size;
        let chunk = &mut buf[..size as usize];
        r.seek(SeekFrom::Start(pos))?;
        r.read_exact(chunk)?;
        for (i, b) in chunk.iter().enumerate().rev() {
            if *b == b'\n' {
                remaining -= 1;
                if remaining == 0 {
                    return Ok(pos + i as u64 + 1);
                }
            }
        }
    }
    Ok(0)
}
