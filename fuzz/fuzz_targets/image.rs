//! The image codec (`cove_blob::image`) that restores guest RAM and disks from a store: a
//! manifest's chunk table and its blob are read back from S3, which Cove does not trust to be
//! intact. Checks, on an in-memory store, both ways an image is read: unpacked whole, and
//! chunk by chunk with `PackedReader` (a lazy resume):
//! - mode 0, a chunk table and a blob straight from the input: no panic; a success gives a
//!   file of the table's size, a decoded chunk has its table length;
//! - mode 1, the input packed then read back: the same bytes come back;
//! - mode 2, as 1 with one blob byte changed: the same bytes come back or the image is
//!   refused as corrupt, never different bytes.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cove_blob::image::{pack_file, unpack_file, Chunk, PackedFile, CHUNK_SIZE};
use cove_blob::{BlobError, BlobStore, PackedReader};
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "image";

/// Reads `n` bytes as a little-endian number (missing bytes are zeros).
fn number(input: &mut &[u8], n: usize) -> u64 {
    let (head, tail) = input.split_at(n.min(input.len()));
    *input = tail;
    head.iter().rev().fold(0, |acc, &b| acc << 8 | u64::from(b))
}

/// A chunk table from the input: a size of up to 4 chunks, up to 5 chunks at any of the first
/// 5 chunk offsets, lengths as given; the totals add up unless the input says otherwise.
fn table(input: &mut &[u8]) -> PackedFile {
    let size = number(input, 4) % (4 * CHUNK_SIZE + 1);
    let count = number(input, 1) % 6;
    let chunks: Vec<Chunk> = (0..count)
        .map(|_| Chunk {
            offset: number(input, 1) % 5 * CHUNK_SIZE,
            len: number(input, 3) as u32,
            stored_len: number(input, 3) as u32,
            crc32: number(input, 4) as u32,
            stored_crc32: (number(input, 1) % 2 == 1).then(|| number(input, 4) as u32),
        })
        .collect();
    let skew = number(input, 1);
    let stored_bytes = chunks.iter().map(|c| u64::from(c.stored_len)).sum::<u64>() + skew % 2;
    let data_bytes = chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() + skew / 2 % 2;
    PackedFile { name: "ram".into(), size, stored_bytes, data_bytes, chunks }
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cove-fuzz-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

async fn run(data: &[u8], dir: &Path) {
    let Some((&mode, mut input)) = data.split_first() else { return };
    let store = BlobStore::from_object_store(Arc::new(object_store::memory::InMemory::new()), "fuzz");
    let dest = dir.join("dest");
    if mode % 3 == 0 {
        let file = table(&mut input);
        store.put(&format!("{PREFIX}/ram"), input.to_vec().into()).await.expect("in-memory put");
        if let Ok(written) = unpack_file(&store, PREFIX, &file, &dest).await {
            assert_eq!(std::fs::metadata(&dest).expect("unpacked").len(), file.size);
            assert!(written <= file.data_bytes);
        }
        let blob = dir.join("blob");
        std::fs::write(&blob, input).expect("blob");
        if let Ok(reader) = PackedReader::open(&blob, file.clone()) {
            let _ = reader.verify();
            let mut buf = Vec::new();
            for (i, c) in file.chunks.iter().enumerate() {
                if reader.decode(i, &mut buf).is_ok() {
                    assert_eq!(buf.len(), c.len as usize, "a decoded chunk has its length");
                }
            }
        }
        return;
    }
    // The input lands at a chunk-aligned offset, so files with leading holes are packed too.
    let at = number(&mut input, 1) % 3 * CHUNK_SIZE;
    let source = dir.join("source");
    let mut content = vec![0u8; at as usize];
    content.extend_from_slice(input);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&source).expect("source");
        f.set_len(content.len() as u64).expect("source size");
        f.write_all_at(input, at).expect("source data");
    }
    let file = pack_file(&store, PREFIX, "ram", &source).await.expect("packing a local file");
    let key = format!("{PREFIX}/ram");
    if mode % 3 == 2 && file.stored_bytes > 0 {
        let mut blob = store.get(&key).await.expect("the packed blob").to_vec();
        let i = (u64::from(mode) * 7919 + input.len() as u64) as usize % blob.len();
        blob[i] ^= 1 << (mode % 8) | 1;
        store.put(&key, blob.into()).await.expect("in-memory put");
    }
    match unpack_file(&store, PREFIX, &file, &dest).await {
        Ok(_) => assert!(std::fs::read(&dest).expect("unpacked") == content, "unpacked bytes differ"),
        Err(BlobError::Corrupt { .. }) if mode % 3 == 2 => {}
        Err(e) => panic!("unpacking a packed file failed: {e}"),
    }
    // Chunk by chunk, one buffer for all, as a lazy resume reads them.
    let blob = dir.join("blob");
    std::fs::write(&blob, store.get(&key).await.expect("the blob").to_vec()).expect("blob");
    let reader = PackedReader::open(&blob, file.clone()).expect("a packed file's table");
    let mut buf = Vec::new();
    for (i, c) in file.chunks.iter().enumerate() {
        match reader.decode(i, &mut buf) {
            Ok(()) => {
                let at = c.offset as usize;
                assert!(buf[..] == content[at..at + c.len as usize], "decoded bytes differ");
            }
            Err(BlobError::Corrupt { .. }) if mode % 3 == 2 => {}
            Err(e) => panic!("decoding a packed chunk failed: {e}"),
        }
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime");
    static SCRATCH: PathBuf = scratch();
}

fuzz_target!(|data: &[u8]| {
    SCRATCH.with(|dir| RUNTIME.with(|rt| rt.block_on(run(data, dir))));
});
