//! The verdict program, as eBPF instructions encoded by hand (no clang, LLVM
//! or bpf-linker at build time):
//!
//! ```text
//!  r6 = r1                          ; keep the __sk_buff context
//!  call bpf_get_socket_cookie       ; r0 = cookie of the socket that received
//!  *(u64 *)(r10 - 8) = r0           ; key on the stack
//!  r1 = held map; r2 = r10 - 8
//!  call bpf_map_lookup_elem         ; is this socket held back?
//!  if r0 != 0 goto pass             ; yes: keep the bytes here
//!  r1 = r6
//!  r2 = peers map                   ; cookie -> peer socket
//!  r3 = r10 - 8
//!  r4 = 0                           ; flags: the peer's egress (send) path
//!  call bpf_sk_redirect_hash
//! pass:
//!  r0 = SK_PASS                     ; redirected if the peer was found;
//!  exit                             ; otherwise kept for userspace to read
//! ```
//!
//! Returning `SK_PASS` without a redirect keeps the bytes in the receiving
//! socket, readable by pglb and charged to that socket's receive memory, so
//! TCP's window closes as they pile up. That is how a session leaves the
//! kernel path (its sockets are "held"), and why a socket whose peer is not
//! in the map never loses data in the kernel.

/// `BPF_FUNC_map_lookup_elem`.
const MAP_LOOKUP_ELEM: i32 = 1;
/// `BPF_FUNC_get_socket_cookie`.
const GET_SOCKET_COOKIE: i32 = 46;
/// `BPF_FUNC_sk_redirect_hash`.
const SK_REDIRECT_HASH: i32 = 72;
/// `BPF_PSEUDO_MAP_FD`: the `src` register of a 64-bit load naming a map fd.
const PSEUDO_MAP_FD: u8 = 1;

/// One eBPF instruction, as the kernel reads it (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | (dst & 0x0f), off, imm }
}

// Opcodes (class | size/op | source).
const MOV64_X: u8 = 0x07 | 0xb0 | 0x08; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_K: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
const STX_DW: u8 = 0x03 | 0x18 | 0x60; // BPF_STX | BPF_DW | BPF_MEM
const LD_IMM64: u8 = 0x18; // BPF_LD (0) | BPF_DW | BPF_IMM (0)
const CALL: u8 = 0x05 | 0x80; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x05 | 0x90; // BPF_JMP | BPF_EXIT

/// `SK_PASS` from `enum sk_action`.
const SK_PASS: i32 = 1;

/// `if r0 != 0 goto +off` (BPF_JMP | BPF_JNE | BPF_K).
const JNE_K: u8 = 0x05 | 0x50;

/// The verdict program for the peers map `peers` (SOCKHASH) and the held
/// map `held` (HASH of cookies).
pub fn verdict(peers: i32, held: i32) -> [Insn; 18] {
    [
        insn(MOV64_X, 6, 1, 0, 0),
        insn(CALL, 0, 0, 0, GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -8, 0),
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, held),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 2, 10, 0, 0),
        insn(ADD64_K, 2, 0, 0, -8),
        insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),
        // To `pass` (index 16) from index 9.
        insn(JNE_K, 0, 0, 7, 0),
        insn(MOV64_X, 1, 6, 0, 0),
        insn(LD_IMM64, 2, PSEUDO_MAP_FD, 0, peers),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 3, 10, 0, 0),
        insn(ADD64_K, 3, 0, 0, -8),
        insn(MOV64_K, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, SK_REDIRECT_HASH),
        insn(MOV64_K, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the kernel's own `include/linux/filter.h` macros
    /// (`BPF_MOV64_REG`, `BPF_EMIT_CALL`, `BPF_STX_MEM`, `BPF_LD_MAP_FD`, ...)
    /// produce for this program.
    #[test]
    fn encodes_like_the_kernel_macros() {
        let bytes: Vec<[u8; 8]> = verdict(7, 9)
            .iter()
            .map(|i| {
                let mut b = [0u8; 8];
                b[0] = i.code;
                b[1] = i.regs;
                b[2..4].copy_from_slice(&i.off.to_le_bytes());
                b[4..8].copy_from_slice(&i.imm.to_le_bytes());
                b
            })
            .collect();
        let expected: [[u8; 8]; 18] = [
            [0xbf, 0x16, 0, 0, 0, 0, 0, 0],
            [0x85, 0x00, 0, 0, 46, 0, 0, 0],
            [0x7b, 0x0a, 0xf8, 0xff, 0, 0, 0, 0],
            [0x18, 0x11, 0, 0, 9, 0, 0, 0],
            [0x00, 0x00, 0, 0, 0, 0, 0, 0],
            [0xbf, 0xa2, 0, 0, 0, 0, 0, 0],
            [0x07, 0x02, 0, 0, 0xf8, 0xff, 0xff, 0xff],
            [0x85, 0x00, 0, 0, 1, 0, 0, 0],
            [0x55, 0x00, 7, 0, 0, 0, 0, 0],
            [0xbf, 0x61, 0, 0, 0, 0, 0, 0],
            [0x18, 0x12, 0, 0, 7, 0, 0, 0],
            [0x00, 0x00, 0, 0, 0, 0, 0, 0],
            [0xbf, 0xa3, 0, 0, 0, 0, 0, 0],
            [0x07, 0x03, 0, 0, 0xf8, 0xff, 0xff, 0xff],
            [0xb7, 0x04, 0, 0, 0, 0, 0, 0],
            [0x85, 0x00, 0, 0, 72, 0, 0, 0],
            [0xb7, 0x00, 0, 0, 1, 0, 0, 0],
            [0x95, 0x00, 0, 0, 0, 0, 0, 0],
        ];
        assert_eq!(bytes, expected);
    }
}
