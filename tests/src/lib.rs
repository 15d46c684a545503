#[test]
fn nested() {
    let out = std::process::Command::new(env!("CARGO")).args(["build", "-p", "pglb", "--bin", "pglb"]).output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
}
