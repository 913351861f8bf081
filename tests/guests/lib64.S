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

.section .rodata
hexdigits: .ascii "0123456789abcdef"
vfail_msg: .asciz "virtio init failed\n"
