//! TLS ClientHellos built by hand for the tests (pglb only reads them).
#![allow(dead_code)]

/// A ClientHello handshake message with a server_name extension (and a
/// padding extension of `padding` bytes, to make large ones).
pub fn message(name: &str, padding: usize) -> Vec<u8> {
    let n = name.as_bytes();
    let mut ext = vec![0, 0];
    ext.extend(((n.len() + 5) as u16).to_be_bytes());
    ext.extend(((n.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend((n.len() as u16).to_be_bytes());
    ext.extend(n);
    // padding extension (21), to make large hellos
    ext.extend([0, 21]);
    ext.extend((padding as u16).to_be_bytes());
    ext.extend(vec![0u8; padding]);
    let mut body = vec![3, 3];
    body.extend([1u8; 32]);
    body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut m = vec![1];
    m.extend(&(body.len() as u32).to_be_bytes()[1..]);
    m.extend(body);
    m
}

pub fn records(message: &[u8], chunk: usize) -> Vec<u8> {
    message
        .chunks(chunk.max(1))
        .flat_map(|c| {
            let mut r = vec![0x16, 3, 1];
            r.extend((c.len() as u16).to_be_bytes());
            r.extend(c);
            r
        })
        .collect()
}

/// `name`'s ClientHello in one record.
pub fn client_hello(name: &str) -> Vec<u8> {
    let m = message(name, 0);
    records(&m, m.len())
}
