//! The client's first message comes from untrusted bytes: whatever arrives
//! — random, truncated, oversized — `read_first` returns an answer without
//! panicking, allocates at most PostgreSQL's 10,000-byte cap (or one TLS
//! record of a direct TLS client), and every valid message comes back byte
//! for byte with the right kind.

use pglb_proxy::protocol::{
    read_first, FirstKind, FirstMessage, FirstMessageError, CANCEL_LENGTHS, MAX_FIRST_MESSAGE, MAX_TLS_RECORD,
};
use proptest::prelude::*;

fn read(bytes: &[u8]) -> Result<FirstMessage, FirstMessageError> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(read_first(&mut &bytes[..]))
}

fn message(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut m = ((8 + rest.len()) as u32).to_be_bytes().to_vec();
    m.extend(code.to_be_bytes());
    m.extend(rest);
    m
}

/// A StartupMessage (protocol 3.x) with these parameters.
fn startup(minor: u16, params: &[(String, String)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in params {
        body.extend(k.as_bytes());
        body.push(0);
        body.extend(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    message((3 << 16) | u32::from(minor), &body)
}

/// A claimed message length, biased towards the edges that matter: tiny,
/// around the 10,000-byte cap, and anything at all.
fn claimed_length() -> impl Strategy<Value = u32> {
    let cap = MAX_FIRST_MESSAGE as u32;
    prop_oneof![0u32..16, cap - 16..cap + 16, 8..=cap, any::<u32>()]
}

/// Bytes that start with a claimed length, then anything.
fn framed() -> impl Strategy<Value = Vec<u8>> {
    (claimed_length(), prop::collection::vec(any::<u8>(), 0..12_000)).prop_map(|(len, body)| {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(body);
        bytes
    })
}

/// Parameter names and values: no NUL inside, non-empty names.
fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("[a-z_]{1,16}", "[^\u{0}]{0,40}"), 0..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_get_an_answer_within_the_cap(bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..12_000), framed()]) {
        match read(&bytes) {
            Ok(first) if first.kind == FirstKind::DirectTls => {
                prop_assert!(first.bytes.len() <= MAX_TLS_RECORD && bytes.starts_with(&first.bytes));
                prop_assert_eq!(first.bytes[0], 0x16);
            }
            Ok(first) => prop_assert!(first.bytes.len() <= MAX_FIRST_MESSAGE && bytes.starts_with(&first.bytes)),
            Err(FirstMessageError::BadLength(n)) => {
                prop_assert!(!(8..=MAX_FIRST_MESSAGE as u32).contains(&n));
                prop_assert_ne!(bytes[0], 0x16, "a first byte 0x16 is read as TLS");
            }
            Err(FirstMessageError::BadCancel(n)) => prop_assert!(!CANCEL_LENGTHS.contains(&n)),
            Err(_) => {}
        }
    }

    #[test]
    fn a_claimed_length_past_the_cap_is_refused_before_reading(
        len in prop_oneof![MAX_FIRST_MESSAGE as u32 + 1..MAX_FIRST_MESSAGE as u32 + 64, MAX_FIRST_MESSAGE as u32 + 1..],
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        prop_assume!(len >> 24 != 0x16);
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(tail);
        prop_assert!(matches!(read(&bytes), Err(FirstMessageError::BadLength(n)) if n == len));
    }

    #[test]
    fn startup_messages_round_trip(minor in prop_oneof![0u16..4, Just(9999), any::<u16>()], params in params()) {
        let bytes = startup(minor, &params);
        prop_assume!(bytes.len() <= MAX_FIRST_MESSAGE);
        let first = read(&bytes).expect("a valid StartupMessage");
        prop_assert_eq!(&first.bytes, &bytes);
        let value = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        prop_assert_eq!(first.kind, FirstKind::Startup { user: value("user"), database: value("database") });
    }

    #[test]
    fn cancel_requests_round_trip(pid in any::<u32>(), key in prop::collection::vec(any::<u8>(), 4..=256)) {
        let mut rest = pid.to_be_bytes().to_vec();
        rest.extend(&key);
        let bytes = message(80_877_102, &rest);
        let first = read(&bytes).expect("a valid CancelRequest");
        prop_assert_eq!(&first.bytes, &bytes);
        prop_assert_eq!(first.kind, FirstKind::Cancel { pid });
    }

    #[test]
    fn cancel_requests_outside_16_to_268_bytes_are_refused(
        pid in any::<u32>(),
        key in prop_oneof![prop::collection::vec(any::<u8>(), 0..4), prop::collection::vec(any::<u8>(), 257..2000)],
    ) {
        let mut rest = pid.to_be_bytes().to_vec();
        rest.extend(&key);
        let bytes = message(80_877_102, &rest);
        prop_assert!(matches!(read(&bytes), Err(FirstMessageError::BadCancel(n)) if n == bytes.len()));
    }

    #[test]
    fn a_tls_record_is_read_whole_and_nothing_after_it(
        minor in 0u8..=4,
        body in prop::collection::vec(any::<u8>(), 1..4096),
        after in prop::collection::vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut record = vec![0x16, 3, minor];
        record.extend((body.len() as u16).to_be_bytes());
        record.extend(&body);
        let whole = [&record[..], &after[..]].concat();
        let first = read(&whole).expect("a TLS record");
        prop_assert_eq!(first.kind, FirstKind::DirectTls);
        prop_assert_eq!(&first.bytes, &record);
        let cut = cut.index(record.len());
        prop_assert!(matches!(read(&record[..cut]), Err(FirstMessageError::Closed)));
    }

    #[test]
    fn a_tls_record_longer_than_16384_bytes_is_refused_before_reading(len in 16_385u32..=65_535) {
        let mut bytes = vec![0x16, 3, 1];
        bytes.extend((len as u16).to_be_bytes());
        prop_assert!(matches!(read(&bytes), Err(FirstMessageError::BadTlsRecord(0x0301, n)) if n == len as usize));
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_a_closed_client(params in params(), cut in any::<prop::sample::Index>()) {
        let bytes = startup(0, &params);
        let cut = cut.index(bytes.len());
        prop_assert!(matches!(read(&bytes[..cut]), Err(FirstMessageError::Closed)));
    }
}
