//! The ClientHello reader behind routing by TLS server name takes untrusted
//! bytes: garbage, truncated records, a handshake split anywhere, or one
//! that never ends — it answers without panicking and never reads more
//! than `MAX_CLIENT_HELLO` bytes.

use pglb_proxy::sni::{read_client_hello, server_name_of, SniError, MAX_CLIENT_HELLO};
use proptest::prelude::*;

mod common;
use common::{message, records};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime")
}

/// Reads a ClientHello from `stream`, the way a session does after
/// `read_first` returned its first record.
fn read(stream: &[u8]) -> Result<pglb_proxy::sni::ClientHello, SniError> {
    let len = stream.get(3..5).map_or(0, |l| usize::from(u16::from_be_bytes([l[0], l[1]])));
    let split = (5 + len).min(stream.len());
    let (first, mut rest) = (stream[..split].to_vec(), &stream[split..]);
    runtime().block_on(read_client_hello(&mut rest, first))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn garbage_gets_an_answer(bytes in prop::collection::vec(any::<u8>(), 0..40_000)) {
        let _ = server_name_of(&bytes);
        if bytes.len() >= 5 {
            if let Ok(hello) = read(&bytes) {
                prop_assert!(hello.bytes.len() <= MAX_CLIENT_HELLO);
            }
        }
    }

    #[test]
    fn a_hello_split_into_any_records_gives_its_name(
        name in "[a-z]{1,20}(\\.[a-z]{1,10}){0,3}",
        padding in 0usize..3000,
        chunk in 1usize..2000,
        after in prop::collection::vec(any::<u8>(), 0..100),
    ) {
        let all = records(&message(&name, padding), chunk);
        prop_assume!(all.len() <= MAX_CLIENT_HELLO);
        let stream = [&all[..], &after[..]].concat();
        let hello = read(&stream).expect("a whole ClientHello");
        prop_assert_eq!(&hello.bytes, &all, "exactly the records");
        prop_assert!(after.starts_with(&hello.after), "what followed them, unchanged");
        prop_assert_eq!(hello.server_name.as_deref(), Some(name.as_str()));
    }

    #[test]
    fn every_truncation_is_a_closed_client(name in "[a-z]{1,20}", chunk in 1usize..40, cut in any::<prop::sample::Index>()) {
        // At least two records (a ClientHello here is over 60 bytes): the
        // cut falls after the first, which `read_first` has read whole.
        let all = records(&message(&name, 0), chunk);
        let first_len = 5 + usize::from(u16::from_be_bytes([all[3], all[4]]));
        prop_assume!(all.len() > first_len);
        let cut = first_len + cut.index(all.len() - first_len);
        prop_assert!(matches!(read(&all[..cut]), Err(SniError::Closed)));
    }

    #[test]
    fn a_hello_that_never_ends_stops_at_the_cap(chunk in 100usize..16_000) {
        // Claims 16 MiB; the records keep coming.
        let mut message = vec![1, 0xff, 0xff, 0xff];
        message.extend(vec![0u8; 3 * MAX_CLIENT_HELLO]);
        prop_assert!(matches!(read(&records(&message, chunk)), Err(SniError::TooLong)));
    }
}

/// An in-memory client that counts the reads asked of it.
struct Counting<'a> {
    rest: &'a [u8],
    reads: usize,
}

impl tokio::io::AsyncRead for Counting<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.reads += 1;
        std::pin::Pin::new(&mut self.rest).poll_read(cx, buf)
    }
}

/// A ClientHello sent in 1-byte records, `size` bytes in all (at most).
fn one_byte_records(size: usize) -> Vec<u8> {
    let bare = message("rw.db.example.com", 0).len();
    let all = records(&message("rw.db.example.com", size / 6 - bare), 1);
    assert!(all.len() <= size && all.len() > size - 12, "{} bytes for {size}", all.len());
    all
}

/// Reads `all` as a session does; the reads it took and the fastest of
/// `rounds` runs.
fn read_counted(all: &[u8], rounds: usize) -> (usize, std::time::Duration) {
    let rt = runtime();
    let mut fastest = std::time::Duration::MAX;
    let mut reads = 0;
    for _ in 0..rounds {
        let mut client = Counting { rest: &all[6..], reads: 0 };
        let started = std::time::Instant::now();
        let hello = rt.block_on(read_client_hello(&mut client, all[..6].to_vec())).expect("a whole ClientHello");
        fastest = fastest.min(started.elapsed());
        assert_eq!(hello.server_name.as_deref(), Some("rw.db.example.com"));
        reads = client.reads;
    }
    (reads, fastest)
}

/// 1-byte records cost a read per few KiB and time in proportion to the
/// bytes: a 32 KiB ClientHello takes about 4 times an 8 KiB one's, not 16
/// (a ratio measured side by side, never an absolute time).
#[test]
fn a_hello_in_one_byte_records_costs_work_in_proportion_to_its_bytes() {
    let (small, large) = (one_byte_records(8 * 1024), one_byte_records(MAX_CLIENT_HELLO));
    let _ = read_counted(&small, 3); // warm up
    let (small_reads, small_time) = read_counted(&small, 15);
    let (large_reads, large_time) = read_counted(&large, 15);
    println!("8 KiB: {small_reads} reads, {small_time:?}; 32 KiB: {large_reads} reads, {large_time:?}");
    assert!(large_reads <= MAX_CLIENT_HELLO / 4096 + 2, "{large_reads} reads for {} bytes", large.len());
    let ratio = large_time.as_secs_f64() / small_time.as_secs_f64();
    assert!(ratio < 8.0, "32 KiB took {ratio:.1} times as long as 8 KiB ({large_time:?} vs {small_time:?})");
}
