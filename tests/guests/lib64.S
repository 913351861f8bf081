# Helpers for 64-bit tiny guests (Linux 64-bit boot entry: long mode, identity map).
.intel_syntax noprefix
.code64
.text

# putc: write al to COM1.
.globl putc
putc:
    push rdx
    mov dx, 0x3f8
    out dx, al
    pop rdx
    ret

# puts: write the NUL-terminated string at rsi.
.globl puts
puts:
    push rax
1:  lodsb
    test al, al
    jz 2f
    call putc
    jmp 1b
2:  pop rax
    ret

# puthex: write eax as 8 hex digits.
.globl puthex
puthex:
    push rcx
    push rbx
    push rax
    mov ecx, 8
1:  rol eax, 4
    mov ebx, eax
    and ebx, 0xf
    push rax
    mov al, byte ptr [hexdigits + rbx]
    call putc
    pop rax
    dec ecx
    jnz 1b
    pop rax
    pop rbx
    pop rcx
    ret

# vinit: virtio-mmio handshake for the device at r12 with r13d queues of 8 entries.
# Queue q: descriptors at 0x200000 + q*0x10000, avail ring +0x1000, used ring +0x2000.
.globl vinit
vinit:
    cmp dword ptr [r12], 0x74726976
    jne vfail
    cmp dword ptr [r12 + 4], 2
    jne vfail
    mov dword ptr [r12 + 0x70], 0
    mov dword ptr [r12 + 0x70], 1
    mov dword ptr [r12 + 0x70], 3
    mov dword ptr [r12 + 0x24], 1
    mov dword ptr [r12 + 0x20], 1
    mov dword ptr [r12 + 0x24], 0
    mov dword ptr [r12 + 0x20], 0
    mov dword ptr [r12 + 0x70], 11
    mov eax, dword ptr [r12 + 0x70]
    test eax, 8
    jz vfail
    xor ecx, ecx
1:  cmp ecx, r13d
    je 2f
    mov dword ptr [r12 + 0x30], ecx
    cmp dword ptr [r12 + 0x34], 8
    jb vfail
    mov dword ptr [r12 + 0x38], 8
    mov eax, ecx
    shl eax, 16
    add eax, 0x200000
    mov dword ptr [r12 + 0x80], eax
    mov dword ptr [r12 + 0x84], 0
    lea edx, [rax + 0x1000]
    mov dword ptr [r12 + 0x90], edx
    mov dword ptr [r12 + 0x94], 0
    lea edx, [rax + 0x2000]
    mov dword ptr [r12 + 0xa0], edx
    mov dword ptr [r12 + 0xa4], 0
    mov dword ptr [r12 + 0x44], 1
    cmp dword ptr [r12 + 0x44], 1
    jne vfail
    inc ecx
    jmp 1b
2:  mov dword ptr [r12 + 0x70], 15
    ret
.globl vfail
vfail:
    lea rsi, [vfail_msg]
    call puts
    cli
    hlt

# irq_init: route IOAPIC pin esi (edge, active high) to vector edx on APIC 0, with
# the handler at rdi (an interrupt gate); enables the LAPIC. Interrupts stay off.
.globl irq_init
irq_init:
    push rax
    push rbx
    push rcx
    mov eax, edx
    shl eax, 4
    lea rcx, [idt]
    add rcx, rax
    mov rax, rdi
    mov word ptr [rcx], ax
    mov word ptr [rcx + 2], 0x8
    mov word ptr [rcx + 4], 0x8e00
    shr rax, 16
    mov word ptr [rcx + 6], ax
    shr rax, 16
    mov dword ptr [rcx + 8], eax
    mov dword ptr [rcx + 12], 0
    lidt [idtr]
    # Mask the legacy PICs: GSIs below 16 also reach them, and through LINT0 they
    # would deliver vectors we have no gates for.
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    mov rbx, 0xfee000f0
    mov dword ptr [rbx], 0x1ff
    mov rbx, 0xfec00000
    lea eax, [rsi * 2 + 0x11]
    mov dword ptr [rbx], eax
    mov dword ptr [rbx + 0x10], 0
    dec eax
    mov dword ptr [rbx], eax
    mov dword ptr [rbx + 0x10], edx
    pop rcx
    pop rbx
    pop rax
    ret

# eoi: end of interrupt at the LAPIC.
.globl eoi
eoi:
    push rbx
    mov rbx, 0xfee000b0
    mov dword ptr [rbx], 0
    pop rbx
    ret

.data
.align 16
idt: .fill 4096, 1, 0
idtr:
    .word 4095
    .quad idt

.section .rodata
hexdigits: .ascii "0123456789abcdef"
vfail_msg: .asciz "virtio init failed\n"
