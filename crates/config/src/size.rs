//! Byte sizes: `16777216`, `16MB`, `512kB`, `1GB` (powers of 1024, as in PostgreSQL).

/// Parses a byte count with an optional `kB`, `MB`, `GB` or `TB` unit.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| format!("`{text}` does not start with a whole number"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        other => return Err(format!("`{other}` is not a size unit (use kB, MB, GB)")),
    };
    value.checked_mul(scale).ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("16MB"), Ok(16 << 20));
        assert_eq!(parse_bytes("512kB"), Ok(512 << 10));
        assert!(parse_bytes("1.5GB").is_err());
        assert!(parse_bytes("lots").is_err());
    }
}
