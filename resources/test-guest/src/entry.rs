//! Entry code in assembly: the Linux 64-bit boot protocol entry (ELF
//! `e_entry`), the PVH entry (32-bit, announced by a `XEN_ELFNOTE_PHYS32_ENTRY`
//! note), the boot-time page tables used by the PVH path, the GDT, the
//! real-mode AP trampoline and the interrupt stubs.
//!
//! Segment selectors (the same as Linux's boot GDT): 0x08 flat 32-bit code,
//! 0x10 64-bit code, 0x18 flat data.

use crate::smp;

/// Kinds of entry, passed to `rust_start`.
pub const ENTRY_LINUX64: u32 = 0;
/// PVH entry (32-bit protected mode, `hvm_start_info` in EBX).
pub const ENTRY_PVH: u32 = 1;

/// Size of the BSP stack.
pub const BSP_STACK_SIZE: usize = 32 * 1024;

/// Physical address where the AP real-mode trampoline is copied (SIPI vector 0x08).
pub const TRAMPOLINE_ADDR: usize = 0x8000;

#[repr(C, align(4096))]
pub struct BspStack(pub [u8; BSP_STACK_SIZE]);

/// The BSP's stack (not zeroed, see linker.ld).
#[link_section = ".noinit.bsp_stack"]
pub static mut BSP_STACK: BspStack = BspStack([0; BSP_STACK_SIZE]);

extern "C" {
    /// Start of the AP trampoline code (copied to `TRAMPOLINE_ADDR`).
    pub static ap_tramp_start: u8;
    /// End of the AP trampoline code.
    pub static ap_tramp_end: u8;
    /// First interrupt stub; stub for vector v is at `isr_stubs + 16 * v`.
    pub static isr_stubs: u8;
    /// End of the loaded image including BSS and stacks.
    pub static __image_end: u8;
}

core::arch::global_asm!(
    r#"
/* 32-bit -> 64-bit switch: EDI = CR3, then far jump to `target` (64-bit). */
    .macro ENTER_LONG_MODE target
    mov $0x20, %eax             /* CR4.PAE */
    mov %eax, %cr4
    mov %edi, %cr3
    mov $0xC0000080, %ecx       /* EFER */
    rdmsr
    or $0x100, %eax             /* EFER.LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* CR0.PG | CR0.PE */
    mov %eax, %cr0
    ljmpl $0x10, $\target
    .endm

/* ---------------------------------------------------------------------
 * Linux x86-64 64-bit boot protocol entry: long mode, paging on with an
 * identity map of at least 1 GiB, RSI = boot_params, interrupts off.
 * The loader's stack (below 0x9000) is left at once.
 * ------------------------------------------------------------------- */
    .section .text.entry, "ax"
    .code64
    .globl linux64_start
linux64_start:
    cli
    cld
    lea {bsp_stack}+{bsp_stack_size}(%rip), %rsp
    mov %rsi, %rbx
    lgdt gdt_ptr(%rip)
    pushq $0x10
    lea 1f(%rip), %rax
    push %rax
    lretq
1:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    call zero_bss
    mov %rbx, %rdi
    mov ${entry_linux64}, %esi
    call {rust_start}
    jmp halt_forever

/* Zero .bss (uses rax, rcx, rdi). */
zero_bss:
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    rep stosq
    ret

    .globl halt_forever
halt_forever:
    cli
    hlt
    jmp halt_forever

/* ---------------------------------------------------------------------
 * PVH entry: 32-bit flat protected mode, paging off, EBX = hvm_start_info.
 * No stack is provided: none is used before long mode.
 * ------------------------------------------------------------------- */
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi
    lgdtl gdt_ptr
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $boot_pml4, %edi
    ENTER_LONG_MODE pvh_start64

    .code64
pvh_start64:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    lea {bsp_stack}+{bsp_stack_size}(%rip), %rsp
    mov %esi, %ebx
    call zero_bss
    mov %rbx, %rdi
    mov ${entry_pvh}, %esi
    call {rust_start}
    jmp halt_forever

/* ---------------------------------------------------------------------
 * AP path. The real-mode part below is copied to 0x8000 (SIPI vector 8);
 * it loads the GDT and jumps to ap_start32 inside the image.
 * ------------------------------------------------------------------- */
    .code16
    .globl ap_tramp_start
    .globl ap_tramp_end
ap_tramp_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_tramp_gdt_ptr - ap_tramp_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_start32
    .balign 4
ap_tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

    .code32
ap_start32:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov {ap_cr3}, %edi
    ENTER_LONG_MODE ap_start64

    .code64
ap_start64:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $1, %eax
    lock xadd %eax, {ap_next}(%rip)
    cmp ${max_aps}, %eax
    jae halt_forever
    mov %eax, %edi
    lea 1(%rax), %rax
    imul ${ap_stack_size}, %rax, %rax
    lea {ap_stacks}(%rip), %rsp
    add %rax, %rsp
    call {ap_main}
    jmp halt_forever

/* ---------------------------------------------------------------------
 * Interrupt stubs: 256 stubs of 16 bytes each. Each pushes a dummy error
 * code (unless the CPU pushes one) and its vector, then joins isr_common.
 * ------------------------------------------------------------------- */
    .section .text.isr, "ax"
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rbx
    push %rbp
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    cld
    mov %rsp, %rdi
    call {isr_dispatch}
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rbp
    pop %rbx
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq

/* ---------------------------------------------------------------------
 * GDT (accessed bits preset so the CPU never writes it).
 * ------------------------------------------------------------------- */
    .section .data.gdt, "aw"
    .balign 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff    /* 0x08: 32-bit code */
    .quad 0x00af9b000000ffff    /* 0x10: 64-bit code */
    .quad 0x00cf93000000ffff    /* 0x18: data */
gdt_end:
    .balign 8
    .globl gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

/* ---------------------------------------------------------------------
 * Boot page tables for the PVH path: identity map of 0..4 GiB with 2 MiB
 * pages, the 3..4 GiB hole uncached. Static data: no work at run time.
 * ------------------------------------------------------------------- */
    .section .data.boot_pt, "aw"
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x3
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x0003
    .quad boot_pd + 0x1003
    .quad boot_pd + 0x2003
    .quad boot_pd + 0x3003
    .fill 508, 8, 0
boot_pd:
    .set addr, 0
    .rept 1536
    .quad addr + 0x83
    .set addr, addr + 0x200000
    .endr
    .rept 512
    .quad addr + 0x9b
    .set addr, addr + 0x200000
    .endr

/* ---------------------------------------------------------------------
 * PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", 32-bit entry.
 * ------------------------------------------------------------------- */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4

    .text
"#,
    bsp_stack = sym BSP_STACK,
    bsp_stack_size = const BSP_STACK_SIZE,
    entry_linux64 = const ENTRY_LINUX64,
    entry_pvh = const ENTRY_PVH,
    rust_start = sym crate::rust_start,
    ap_cr3 = sym smp::AP_CR3,
    ap_next = sym smp::AP_NEXT_INDEX,
    max_aps = const smp::MAX_APS,
    ap_stack_size = const smp::AP_STACK_SIZE,
    ap_stacks = sym smp::AP_STACKS,
    ap_main = sym smp::ap_main,
    isr_dispatch = sym crate::interrupts::isr_dispatch,
    options(att_syntax)
);

/// Physical address of the first byte after the image (BSS and stacks included).
pub fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}

/// Address of the interrupt stub for `vector`.
pub fn isr_stub(vector: usize) -> u64 {
    core::ptr::addr_of!(isr_stubs) as u64 + 16 * vector as u64
}

/// The AP trampoline code as a byte slice.
pub fn trampoline() -> &'static [u8] {
    // SAFETY: ap_tramp_start..ap_tramp_end is a contiguous range of the loaded
    // .text section, defined in the asm above, start <= end.
    unsafe {
        let start = core::ptr::addr_of!(ap_tramp_start);
        let end = core::ptr::addr_of!(ap_tramp_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}
