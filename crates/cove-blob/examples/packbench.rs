//! Measures pack_file / unpack_file on a realistic guest RAM file, to keep the pause/resume
//! budget honest. Targets on a 2-core host: packing a 1 GiB RAM file holding 512 MiB of data
//! to the local store well under 1 s, unpacking ~150 MiB of data well under 100 ms.
//!
//! ```sh
//! cargo run --release -p cove-blob --example packbench -- [SIZE_MIB] [DATA_MIB] [STORE_URL] [ROUNDS]
//! ```
//!
//! Builds a SIZE_MIB (default 1024) sparse file on /dev/shm holding DATA_MIB (default 512) of
//! data in 4 MiB extents spread over the file, half random bytes and half repeating text, packs
//! it to STORE_URL (default a fresh directory under /var/tmp), unpacks it back to /dev/shm,
//! checks the copy, and prints the times and the peak RSS so far; ROUNDS (default 3) times.
//! Then it does the same twice with 152 MiB of data.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Instant;

use cove_blob::{pack_file, unpack_file, BlobStore};
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;

fn build(path: &Path, size_mib: u64, data_mib: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size_mib * MIB).unwrap();
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let text = b"[ 12.345678] systemd[1]: Started user@1000.service - User Manager for UID 1000.\n"
        .repeat((4 * MIB as usize) / 80 + 1);
    let extents = data_mib / 4;
    let stride = size_mib / extents.max(1);
    let mut random = vec![0u8; 4 * MIB as usize];
    for i in 0..extents {
        let offset = i * stride * MIB;
        if i % 2 == 0 {
            rng.fill_bytes(&mut random);
            f.write_all_at(&random, offset).unwrap();
        } else {
            f.write_all_at(&text[..4 * MIB as usize], offset).unwrap();
        }
    }
}

/// The process's peak resident memory so far (VmHWM), in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// Compares two files piecewise (reading both whole would dominate a profile of this bench).
fn identical(a: &Path, b: &Path) -> bool {
    let (a, b) = (File::open(a).unwrap(), File::open(b).unwrap());
    let len = a.metadata().unwrap().len();
    if b.metadata().unwrap().len() != len {
        return false;
    }
    let (mut x, mut y) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(4 * MIB) as usize;
        a.read_exact_at(&mut x[..n], offset).unwrap();
        b.read_exact_at(&mut y[..n], offset).unwrap();
        if x[..n] != y[..n] {
            return false;
        }
        offset += n as u64;
    }
    true
}

async fn round(store: &BlobStore, shm: &Path, size_mib: u64, data_mib: u64) {
    let src = shm.join("cove-packbench-src");
    let dest = shm.join("cove-packbench-dest");
    build(&src, size_mib, data_mib);
    let prefix = format!("bench-{size_mib}-{data_mib}");

    let t = Instant::now();
    let packed = pack_file(store, &prefix, "ram", &src).await.unwrap();
    let pack = t.elapsed();
    let hwm_pack = peak_rss_mib();

    let t = Instant::now();
    let written = unpack_file(store, &prefix, &packed, &dest).await.unwrap();
    let unpack = t.elapsed();
    let hwm_unpack = peak_rss_mib();

    let same = identical(&src, &dest);
    let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
    println!(
        "{size_mib} MiB file, {data_mib} MiB data: pack {:.0} ms ({} chunks, {:.0} MiB stored), \
         unpack {:.0} ms ({:.0} MiB written, {:.0} MiB allocated), identical: {same}; \
         peak RSS {hwm_pack} MiB after pack, {hwm_unpack} MiB after unpack",
        pack.as_secs_f64() * 1e3,
        packed.chunks.len(),
        packed.stored_bytes as f64 / MIB as f64,
        unpack.as_secs_f64() * 1e3,
        written as f64 / MIB as f64,
        allocated as f64 / MIB as f64,
    );
    assert!(same, "unpacked file differs");
    store.delete_prefix(&prefix).await.unwrap();
    std::fs::remove_file(&src).unwrap();
    std::fs::remove_file(&dest).unwrap();
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size_mib: u64 = args.first().map_or(1024, |s| s.parse().expect("SIZE_MIB"));
    let data_mib: u64 = args.get(1).map_or(512, |s| s.parse().expect("DATA_MIB"));
    let scratch = tempfile::Builder::new().prefix("cove-packbench-").tempdir_in("/var/tmp").unwrap();
    let url = args
        .get(2)
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| format!("file://{}", scratch.path().display()));
    let store = BlobStore::open(&url).unwrap();
    println!("store: {}", store.description());
    let shm = Path::new("/dev/shm");
    let rounds: usize = args.get(3).map_or(3, |s| s.parse().expect("ROUNDS"));
    for _ in 0..rounds {
        round(&store, shm, size_mib, data_mib).await;
    }
    round(&store, shm, size_mib, 152).await;
    round(&store, shm, size_mib, 152).await;
}
