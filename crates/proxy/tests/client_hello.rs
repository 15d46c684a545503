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
        prop_assert_eq!(&hello.bytes, &all, "exactly the records, nothing after");
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
