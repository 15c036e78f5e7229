# Ferry workload guest: a multiboot v1 image that stresses and checks live migration.
#
# Boots in 32-bit protected mode (as `qemu -kernel` and `ferry run` enter it), switches to
# long mode with an identity map, starts the application processors with INIT/SIPI, fills
# all test memory with a known pattern, then loops forever on every vCPU:
#   - sweep its slice of the hot working set: check each page holds what this vCPU last
#     wrote there, then write the next generation (two qwords per page: offset 0 and 4088);
#   - verify a batch of its cold (never rewritten) pages;
#   - the BSP emits a heartbeat byte every `hb` ms and a status line about once a second,
#     "FERRY-GUEST ok sweeps=N fails=F stall_us=S", S being the longest time in that second
#     the BSP went without progress (host preemption, dirty-log calls, migration pauses).
# Any page that does not hold the value last written is reported on the serial port as
#   FERRY-GUEST FAIL cpu=N addr=0x... expected=0x... got=0x...
#
# Command line (multiboot cmdline, i.e. `--append`): space-separated key=value tokens,
# unknown tokens ignored (QEMU prepends the image path):
#   ws=SIZE    hot working set, total over all vCPUs (K/M/G suffix), default 16M
#   rate=N     pages per second each vCPU writes (0 = as fast as it can), default 0
#   hb=MS      heartbeat period in ms (0 = none), default 1
#   cold=N     cold pages each vCPU verifies per sweep, default 256
#   dma=0|1    exercise the Ferry test DMA device (VMM writes guest memory), default 0
#   cpus=N     wait for exactly N CPUs (default: whoever answers the SIPI in 100 ms)
#   fill=0|1   fill (and later verify) the cold memory, default 1; fill=0 leaves it as it is
#   mark=0|1   print '+' each time the BSP completes a sweep of its hot slice, default 0
#   tdev=N     N Ferry test devices are present (0..16), default 0. Device d's memory is MMIO
#              at TDEV_BASE + d * 16 MiB; the guest owns its pages 0..63 (the device changes
#              the upper half of its memory; the guest never touches above page 63). After
#              every sweep of its hot slice the BSP visits 8 of those 64 pages of each device
#              (a rotating cursor per device): it reads the qwords at offsets 0 and 4088,
#              checks each holds what it last wrote there (tdev_vals; 0 before the first
#              write, as a fresh device holds), then writes gen << 16 | d << 8 | page to both.
#              A mismatch is a FAIL line like any other, with addr the MMIO address. Every
#              access is one 8-byte mov (one MMIO exit). Without a device there (e.g. under
#              QEMU) the writes are lost, so tdev=N reports FAIL lines for those addresses.
#   active=N   only the first N CPUs (the BSP and the first N-1 APs to check in) run the
#              workload, default 0 = all; the others check in (`cpus=` counts them) and then
#              halt forever (cli; hlt), as the idle vCPUs of a big VM. The hot and cold slices
#              are split over the N active CPUs only, and nothing waits for the halted ones.
#
# Built twice: as ELF32 (QEMU's default path) and as a flat image that uses the multiboot
# header's load-address fields (flag bit 16), selected by KLUDGE.

.intel_syntax noprefix

.ifndef KLUDGE
.set KLUDGE, 0
.endif

.set MB_MAGIC,      0x1BADB002
.set MB_FLAGS,      0x00000003 | (KLUDGE << 16)
.set COM1,          0x3F8
.set DMA_PORT_GPA,  0xFE0
.set DMA_PORT_LO,   0xFE4
.set DMA_PORT_HI,   0xFE8
.set TEST_BASE,     0x400000          # test memory starts at 4 MiB
.set MAX_CPUS,      64
.set STACK_SIZE,    16384
.set MAX_GIB,       64                # identity map covers at most 64 GiB
.set MAX_REGIONS,   16
.set TRAMPOLINE,    0x8000
.set LAPIC,         0xFEE00000
.set GEN_SHIFT,     40
.set DMA_PAGES,     16
.set TDEV_BASE,     0xD0000000        # test device d's memory: TDEV_BASE + d * TDEV_STRIDE
.set TDEV_STRIDE,   0x01000000
.set TDEV_MAX,      16
.set TDEV_PAGES,    64                # pages the guest owns in each device window
.set TDEV_BATCH,    8                 # pages per device per BSP sweep
.set TDEV_GEN_SHIFT, 16

# ---------------------------------------------------------------------------------------------
.section .multiboot, "a"
.align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
.if KLUDGE
    .long mb_header                   # header_addr
    .long __image_start               # load_addr
    .long __data_end                  # load_end_addr
    .long __bss_end                   # bss_end_addr
    .long entry32                     # entry_addr
.endif

# ---------------------------------------------------------------------------------------------
.section .text32, "ax"
.code32
.globl entry32
entry32:
    cli
    cld
    mov     esp, offset boot_stack_top
    mov     [mb_magic], eax
    mov     [mb_info], ebx
    lgdt    [gdt_ptr]
    ljmp    0x08, offset 1f
1:  mov     ax, 0x10
    mov     ds, ax
    mov     es, ax
    mov     ss, ax
    mov     fs, ax
    mov     gs, ax

    # How many GiB to map: the highest end of any memory-map entry, at least 4 (LAPIC).
    mov     dword ptr [map_gib], 4
    cmp     dword ptr [mb_magic], 0x2BADB002
    jne     .Lmap_done
    mov     ebx, [mb_info]
    test    dword ptr [ebx], 1 << 6
    jz      .Lmap_done
    mov     esi, [ebx + 48]           # mmap_addr
    mov     edi, esi
    add     edi, [ebx + 44]           # mmap_length
.Lmap_next:
    cmp     esi, edi
    jae     .Lmap_done
    cmp     dword ptr [esi + 20], 1   # only available RAM counts
    jne     .Lmap_skip
    mov     eax, [esi + 4]            # base_addr low
    mov     edx, [esi + 8]            # base_addr high
    add     eax, [esi + 12]           # + length low
    adc     edx, [esi + 16]           # + length high
    # GiB count = ceil(end / 2^30) = (end + 2^30 - 1) >> 30
    add     eax, 0x3FFFFFFF
    adc     edx, 0
    shrd    eax, edx, 30
    shr     edx, 30
    test    edx, edx
    jnz     .Lmap_max
    cmp     eax, MAX_GIB
    ja      .Lmap_max
    cmp     eax, [map_gib]
    jbe     .Lmap_skip
    mov     [map_gib], eax
    jmp     .Lmap_skip
.Lmap_max:
    mov     dword ptr [map_gib], MAX_GIB
.Lmap_skip:
    add     esi, [esi]                # entry size (excludes the size field itself)
    add     esi, 4
    jmp     .Lmap_next
.Lmap_done:

    # Page tables: PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries are 2 MiB pages.
    mov     eax, offset pdpt
    or      eax, 3
    mov     [pml4], eax
    mov     ecx, [map_gib]
    xor     esi, esi                  # GiB index
.Lpdpt_fill:
    mov     eax, esi
    shl     eax, 12
    add     eax, offset pds
    or      eax, 3
    mov     [pdpt + esi * 8], eax
    inc     esi
    cmp     esi, ecx
    jb      .Lpdpt_fill
    # PD entries: entry k (over all PDs) maps physical k * 2 MiB.
    shl     ecx, 9                    # number of 2 MiB entries
    xor     esi, esi
.Lpd_fill:
    mov     eax, esi
    shl     eax, 21
    or      eax, 0x83                 # present, writable, 2 MiB page
    mov     edx, esi
    shr     edx, 11                   # high bits of k * 2 MiB
    mov     [pds + esi * 8], eax
    mov     [pds + esi * 8 + 4], edx
    inc     esi
    cmp     esi, ecx
    jb      .Lpd_fill

enter_long_mode:
    mov     eax, cr4
    or      eax, 0x20                 # PAE
    mov     cr4, eax
    mov     eax, offset pml4
    mov     cr3, eax
    mov     ecx, 0xC0000080           # EFER
    rdmsr
    or      eax, 0x100                # LME
    wrmsr
    mov     eax, cr0
    or      eax, 0x80000001           # PG | PE
    mov     cr0, eax
    ljmp    0x18, offset entry64

# Application processors arrive here from the real-mode trampoline, in protected mode.
.globl ap_entry32
ap_entry32:
    mov     ax, 0x10
    mov     ds, ax
    mov     es, ax
    mov     ss, ax
    mov     fs, ax
    mov     gs, ax
    mov     eax, cr4
    or      eax, 0x20
    mov     cr4, eax
    mov     eax, offset pml4
    mov     cr3, eax
    mov     ecx, 0xC0000080
    rdmsr
    or      eax, 0x100
    wrmsr
    mov     eax, cr0
    or      eax, 0x80000001
    mov     cr0, eax
    ljmp    0x18, offset ap_entry64

# Real-mode trampoline, copied to TRAMPOLINE (0x8000) by the BSP; SIPI vector 0x08.
.code16
trampoline_start:
    cli
    xor     ax, ax
    mov     ds, ax
    data32 lgdt [TRAMPOLINE + (tramp_gdt_ptr - trampoline_start)]
    mov     eax, cr0
    or      eax, 1
    mov     cr0, eax
    .byte   0x66, 0xEA                # ljmpl 0x08:ap_entry32
    .long   ap_entry32
    .word   0x08
.align 4
tramp_gdt_ptr:
    .word   gdt_end - gdt - 1
    .long   gdt
trampoline_end:

# ---------------------------------------------------------------------------------------------
.section .text, "ax"
.code64
entry64:
    mov     ax, 0x10
    mov     ds, ax
    mov     es, ax
    mov     ss, ax
    mov     rsp, offset boot_stack_top

    call    parse_cmdline
    call    parse_memory
    call    calibrate_tsc

    lea     rsi, [rip + msg_boot]
    call    puts_locked_begin
    mov     rax, [mem_total_pages]
    shr     rax, 8                    # pages -> MiB
    call    put_dec
    lea     rsi, [rip + msg_mib_ws]
    call    puts
    mov     rax, [hot_pages]
    shr     rax, 8
    call    put_dec
    lea     rsi, [rip + msg_mib_tsc]
    call    puts
    mov     rax, [tsc_per_ms]
    call    put_dec
    lea     rsi, [rip + msg_nl]
    call    puts_locked_end

    call    start_aps

    # Per-CPU slices are known once the CPU count is.
    call    compute_slices
    mov     byte ptr [go], 1
    xor     ebx, ebx                  # BSP is cpu 0
    jmp     cpu_main

ap_entry64:
    mov     ax, 0x10
    mov     ds, ax
    mov     es, ax
    mov     ss, ax
    mov     ebx, 1
    lock xadd [cpus_up], ebx          # ebx = this AP's index (1, 2, ...)
    cmp     ebx, MAX_CPUS
    jae     .Lap_park
    mov     eax, [want_active]        # active=N: APs past the first N-1 halt at once
    test    eax, eax
    jz      1f
    cmp     ebx, eax
    jae     .Lap_park
1:  mov     rax, rbx
    inc     rax
    imul    rax, rax, STACK_SIZE
    lea     rsp, [rip + ap_stacks]
    add     rsp, rax
.Lap_wait:
    pause
    cmp     byte ptr [go], 0
    je      .Lap_wait
    cmp     ebx, [nactive]            # not active (or checked in after the count): halt
    jae     .Lap_park
    jmp     cpu_main
.Lap_park:
    cli
    hlt
    jmp     .Lap_park

# ---------------------------------------------------------------------------------------------
# cpu_main: rbx = cpu index. Fill, then loop forever.
cpu_main:
    mov     r15, rbx                  # r15 = cpu index for the whole loop
    # Fill this CPU's hot and cold slices with generation 0.
    mov     rdi, [hot_lo + r15 * 8]
    mov     rcx, [hot_hi + r15 * 8]
    call    fill_range
    cmp     byte ptr [fill_on], 0
    je      1f
    mov     rdi, [cold_lo + r15 * 8]
    mov     rcx, [cold_hi + r15 * 8]
    call    fill_range
1:  lock inc dword ptr [filled]
.Lfill_wait:
    pause
    mov     eax, [filled]
    cmp     eax, [nactive]
    jb      .Lfill_wait

    test    r15, r15
    jnz     .Lready_done
    lea     rsi, [rip + msg_ready]
    call    puts_locked_begin
    mov     eax, [ncpus]
    call    put_dec
    lea     rsi, [rip + msg_nl]
    call    puts_locked_end
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     [next_status], rax
    mov     [next_hb], rax
    mov     [last_tick], rax
.Lready_done:
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     [pace_next + r15 * 8], rax
    mov     qword ptr [gen + r15 * 8], 1

.Lsweep:
    mov     r12, [gen + r15 * 8]      # generation being written
    mov     r13, r12
    dec     r13
    shl     r13, GEN_SHIFT            # previous generation, shifted
    shl     r12, GEN_SHIFT            # this generation, shifted
    mov     rdi, [hot_lo + r15 * 8]   # address cursor
    mov     r14, [hot_hi + r15 * 8]
    xor     ebp, ebp                  # pages since last tick
.Lhot_page:
    cmp     rdi, r14
    jae     .Lhot_done
    lea     rdx, [r13 + rdi]          # expected value
    mov     rax, [rdi]
    cmp     rax, rdx
    jne     .Lhot_bad0
    not     rdx
    mov     rax, [rdi + 4088]
    cmp     rax, rdx
    jne     .Lhot_bad1
.Lhot_write:
    lea     rax, [r12 + rdi]
    mov     [rdi], rax
    not     rax
    mov     [rdi + 4088], rax
    add     rdi, 4096
    inc     ebp
    cmp     ebp, 16
    jb      .Lhot_page
    xor     ebp, ebp
    call    tick
    jmp     .Lhot_page
.Lhot_bad0:
    mov     rsi, rdi
    call    report_fail               # rsi = addr, rdx = expected, rax = got
    jmp     .Lhot_write
.Lhot_bad1:
    lea     rsi, [rdi + 4088]
    call    report_fail
    jmp     .Lhot_write
.Lhot_done:
    inc     qword ptr [gen + r15 * 8]
    # mark=1: a '+' after every BSP sweep (skipped when another CPU is printing).
    test    r15, r15
    jnz     1f
    cmp     byte ptr [mark_on], 0
    je      1f
    mov     al, 1
    xchg    al, [print_lock]
    test    al, al
    jnz     1f
    mov     dx, COM1
    mov     al, '+'
    out     dx, al
    mov     byte ptr [print_lock], 0
1:  call    tick

    # Verify a batch of cold pages (generation 0: w0 = addr, w1 = ~addr).
    mov     rdi, [cold_cur + r15 * 8]
    mov     r14, [cold_hi + r15 * 8]
    mov     ecx, [cold_batch]
    test    ecx, ecx
    jz      .Lcold_done
    cmp     rdi, r14
    jae     .Lcold_done               # empty slice
.Lcold_page:
    call    cold_check_page
    call    next_test_page            # rdi -> next page of test memory (skips holes)
    cmp     rdi, r14
    jb      .Lcold_nowrap
    mov     rdi, [cold_lo + r15 * 8]
.Lcold_nowrap:
    inc     ebp
    cmp     ebp, 16
    jb      .Lcold_next
    xor     ebp, ebp
    push    rcx
    push    rdi
    call    tick_nopace
    pop     rdi
    pop     rcx
.Lcold_next:
    dec     ecx
    jnz     .Lcold_page
    mov     [cold_cur + r15 * 8], rdi
.Lcold_done:

    test    r15, r15
    jnz     .Lsweep
    cmp     byte ptr [dma_on], 0
    je      1f
    call    dma_step
1:  cmp     dword ptr [tdev_count], 0
    je      .Lsweep
    call    tdev_step
    jmp     .Lsweep

# cold_check_page: rdi = page address. Clobbers rax, rdx, rsi.
cold_check_page:
    mov     rdx, rdi
    mov     rax, [rdi]
    cmp     rax, rdx
    jne     1f
2:  not     rdx
    mov     rax, [rdi + 4088]
    cmp     rax, rdx
    jne     3f
    ret
1:  mov     rsi, rdi
    push    rdx
    call    report_fail
    pop     rdx
    mov     [rdi], rdx                # repair so the failure is reported once
    jmp     2b
3:  lea     rsi, [rdi + 4088]
    call    report_fail
    mov     [rdi + 4088], rdx
    ret

# next_test_page: rdi = page in test memory -> rdi = next page in test memory, or the end of the
# last region. Clobbers rax, rsi.
next_test_page:
    add     rdi, 4096
    xor     esi, esi
1:  cmp     esi, [nregions]
    jae     3f
    mov     rax, [reg_end + rsi * 8]
    cmp     rdi, rax
    jb      2f                        # rdi below this region's end
    inc     esi
    jmp     1b
2:  mov     rax, [reg_start + rsi * 8]
    cmp     rdi, rax
    jae     3f
    mov     rdi, rax                  # in a hole: jump to the region's start
3:  ret

# fill_range: rdi = first page, rcx = end (exclusive), across regions. Writes generation 0.
fill_range:
    mov     r14, rcx
    xor     ebp, ebp
1:  cmp     rdi, r14
    jae     2f
    mov     rax, rdi
    mov     [rdi], rax
    not     rax
    mov     [rdi + 4088], rax
    call    next_test_page
    inc     ebp
    cmp     ebp, 256
    jb      1b
    xor     ebp, ebp
    push    rdi
    test    r15, r15
    jnz     3f
    call    heartbeat_maybe           # keep the heartbeat going during a long fill
3:  pop     rdi
    jmp     1b
2:  ret

# tick: called every 16 hot pages: pacing (rate=) and, on the BSP, heartbeat and status.
tick:
    mov     eax, [rate_delay]         # TSC ticks per 16 pages, 0 = no pacing
    test    eax, eax
    jz      tick_nopace
    mov     rsi, [pace_next + r15 * 8]
    add     rsi, rax
    mov     [pace_next + r15 * 8], rsi
1:  rdtsc
    shl     rdx, 32
    or      rax, rdx
    cmp     rax, rsi
    jae     2f
    push    rsi
    call    tick_nopace
    pop     rsi
    pause
    jmp     1b
2:  # fell far behind (paused VM, migration): do not try to catch up
    sub     rax, rsi
    mov     edx, [rate_delay]
    shl     rdx, 6
    cmp     rax, rdx
    jb      tick_nopace
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     [pace_next + r15 * 8], rax
tick_nopace:
    test    r15, r15
    jnz     9f
    push    rdi
    # Longest gap between ticks (a tick is 16 pages): how long the vCPU made no progress.
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     rdx, rax
    sub     rax, [last_tick]
    mov     [last_tick], rdx
    cmp     rax, [stall_max]
    jbe     1f
    mov     [stall_max], rax
1:  call    heartbeat_maybe
    pop     rdi
9:  ret

# heartbeat_maybe (BSP only): a '.' every hb ms (a newline every 64), a status line every second.
heartbeat_maybe:
    mov     rsi, [hb_ticks]
    test    rsi, rsi
    jz      3f
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     rdi, rax                  # now
    cmp     rax, [next_hb]
    jb      3f
    # next_hb = max(next_hb + hb_ticks, now - hb_ticks) so a stall does not cause a burst
    mov     rdx, [next_hb]
    add     rdx, rsi
    mov     rax, rdi
    sub     rax, rsi
    cmp     rdx, rax
    jae     1f
    mov     rdx, rax
1:  mov     [next_hb], rdx
    mov     al, 1
    xchg    al, [print_lock]
    test    al, al
    jnz     3f                        # another CPU is printing: skip this beat
    mov     dx, COM1
    mov     al, '.'
    inc     dword ptr [hb_count]
    test    dword ptr [hb_count], 63
    jnz     2f
    mov     al, '\n'
2:  out     dx, al
    mov     byte ptr [print_lock], 0
3:  # status line about once a second
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    cmp     rax, [next_status]
    jb      4f
    mov     rdx, [tsc_per_ms]
    imul    rdx, rdx, 1000
    add     rax, rdx
    mov     [next_status], rax
    push    rbx
    lea     rsi, [rip + msg_status]
    call    puts_locked_begin
    mov     rax, [gen]
    call    put_dec
    lea     rsi, [rip + msg_fails]
    call    puts
    mov     eax, [fails]
    call    put_dec
    lea     rsi, [rip + msg_stall]
    call    puts
    mov     rax, [stall_max]          # TSC ticks -> microseconds
    imul    rax, rax, 1000
    xor     edx, edx
    mov     rcx, [tsc_per_ms]
    div     rcx
    call    put_dec
    mov     qword ptr [stall_max], 0
    lea     rsi, [rip + msg_nl]
    call    puts_locked_end
    pop     rbx
4:  ret

# dma_step (BSP): ask the VMM to write a value into one of DMA_PAGES pages, check it landed,
# and check the page still holds what the VMM wrote there last time.
dma_step:
    mov     ecx, [dma_count]
    and     ecx, DMA_PAGES - 1
    mov     rdi, rcx
    shl     rdi, 12
    lea     rax, [rip + dma_area]
    add     rdi, rax                  # page
    mov     rdx, [dma_vals + rcx * 8] # expected (0 before the first write)
    mov     rax, [rdi]
    cmp     rax, rdx
    je      1f
    mov     rsi, rdi
    push    rcx
    push    rdi
    call    report_fail
    pop     rdi
    pop     rcx
1:  mov     eax, [dma_count]
    inc     eax
    mov     [dma_count], eax
    shl     rax, 8
    or      rax, rcx
    mov     rdx, 0xD000000000000000
    or      rax, rdx                  # new value
    mov     [dma_vals + rcx * 8], rax
    mov     r8, rax
    mov     dx, DMA_PORT_LO
    out     dx, eax
    shr     rax, 32
    mov     dx, DMA_PORT_HI
    out     dx, eax
    mov     eax, edi
    mov     dx, DMA_PORT_GPA
    out     dx, eax                   # the VMM writes now
    mov     rax, [rdi]
    cmp     rax, r8
    je      2f
    mov     rdx, r8
    mov     rsi, rdi
    call    report_fail
    mov     [rdi], r8                 # no DMA device (e.g. under QEMU): do not repeat forever
2:  ret

# tdev_step (BSP, tdev=N): for each test device d < N, check and rewrite TDEV_BATCH of its
# pages 0..TDEV_PAGES-1, from its cursor on. Both qwords of a page (offsets 0 and 4088) must
# hold what was last written there (tdev_vals[d][page]); both then get
# gen << TDEV_GEN_SHIFT | d << 8 | page (nonzero: gen >= 2 here, and new on every visit).
# Clobbers everything but r15 (and rbx, rsp).
tdev_step:
    mov     r12, [gen]                # the sweep just completed
    shl     r12, TDEV_GEN_SHIFT
    xor     r13d, r13d                # device
.Ltdev_dev:
    imul    r10, r13, TDEV_STRIDE
    mov     eax, TDEV_BASE
    add     r10, rax                  # the device's window
    mov     ebp, [tdev_cur + r13 * 4] # page cursor
    mov     r14d, TDEV_BATCH
.Ltdev_page:
    mov     rdi, rbp
    shl     rdi, 12
    add     rdi, r10                  # MMIO address of the page
    mov     r9, r13
    shl     r9, 6
    add     r9, rbp                   # table index d * TDEV_PAGES + page
    mov     rdx, [tdev_vals + r9 * 8] # expected
    mov     rax, [rdi]
    cmp     rax, rdx
    jne     .Ltdev_bad0
.Ltdev_w1:
    mov     rax, [rdi + 4088]
    cmp     rax, rdx
    jne     .Ltdev_bad1
.Ltdev_write:
    mov     rax, r13
    shl     rax, 8
    or      rax, rbp
    or      rax, r12                  # new value
    mov     [rdi], rax
    mov     [rdi + 4088], rax
    mov     [tdev_vals + r9 * 8], rax
    inc     ebp
    and     ebp, TDEV_PAGES - 1
    dec     r14d
    jnz     .Ltdev_page
    mov     [tdev_cur + r13 * 4], ebp
    call    tick_nopace               # MMIO exits are slow: keep heartbeat and stall honest
    inc     r13d
    cmp     r13d, [tdev_count]
    jb      .Ltdev_dev
    ret
.Ltdev_bad0:
    mov     rsi, rdi
    call    report_fail               # rsi = addr, rdx = expected, rax = got
    jmp     .Ltdev_w1
.Ltdev_bad1:
    lea     rsi, [rdi + 4088]
    call    report_fail
    jmp     .Ltdev_write

# report_fail: rsi = address, rdx = expected, rax = got. Preserves all but flags.
report_fail:
    push    rax
    push    rbx
    push    rcx
    push    rdx
    push    rsi
    push    rdi
    push    rbp
    mov     rbx, rax
    mov     rbp, rsi
    mov     rdi, rdx
    lock inc dword ptr [fails]
    lea     rsi, [rip + msg_fail]
    call    puts_locked_begin
    mov     rax, r15
    call    put_dec
    lea     rsi, [rip + msg_addr]
    call    puts
    mov     rax, rbp
    call    put_hex
    lea     rsi, [rip + msg_expected]
    call    puts
    mov     rax, rdi
    call    put_hex
    lea     rsi, [rip + msg_got]
    call    puts
    mov     rax, rbx
    call    put_hex
    lea     rsi, [rip + msg_nl]
    call    puts_locked_end
    pop     rbp
    pop     rdi
    pop     rsi
    pop     rdx
    pop     rcx
    pop     rbx
    pop     rax
    ret

# ---------------------------------------------------------------------------------------------
# Serial output. puts_locked_begin takes the print lock, then prints rsi; puts_locked_end
# prints rsi and releases it.
puts_locked_begin:
    mov     al, 1
1:  xchg    al, [print_lock]
    test    al, al
    jz      puts
    pause
    mov     al, 1
    jmp     1b
puts_locked_end:
    call    puts
    mov     byte ptr [print_lock], 0
    ret
# puts: rsi = NUL-terminated string. Clobbers rax, rdx, rsi.
puts:
    mov     dx, COM1
1:  mov     al, [rsi]
    test    al, al
    jz      2f
    out     dx, al
    inc     rsi
    jmp     1b
2:  ret
# put_hex: rax = value, printed as 0x followed by 16 hex digits. Clobbers rax, rcx, rdx, rsi.
put_hex:
    mov     rsi, rax
    mov     dx, COM1
    mov     al, '0'
    out     dx, al
    mov     al, 'x'
    out     dx, al
    mov     ecx, 16
1:  rol     rsi, 4
    mov     eax, esi
    and     eax, 15
    cmp     eax, 10
    jb      2f
    add     eax, 'a' - '0' - 10
2:  add     eax, '0'
    out     dx, al
    dec     ecx
    jnz     1b
    ret
# put_dec: rax = value. Clobbers rax, rcx, rdx, rsi.
put_dec:
    sub     rsp, 32
    lea     rsi, [rsp + 31]
    mov     byte ptr [rsi], 0
    mov     ecx, 10
1:  xor     edx, edx
    div     rcx
    add     dl, '0'
    dec     rsi
    mov     [rsi], dl
    test    rax, rax
    jnz     1b
    call    puts
    add     rsp, 32
    ret

# ---------------------------------------------------------------------------------------------
# parse_cmdline: read key=value tokens from the multiboot command line.
parse_cmdline:
    cmp     dword ptr [mb_magic], 0x2BADB002
    jne     9f
    mov     ebx, [mb_info]
    test    dword ptr [rbx], 1 << 2
    jz      9f
    mov     esi, [rbx + 16]           # cmdline (physical, identity mapped)
1:  mov     al, [rsi]
    test    al, al
    jz      9f
    cmp     al, ' '
    jne     2f
    inc     rsi
    jmp     1b
2:  # token at rsi: try each key
    lea     rdi, [rip + key_ws]
    call    match_key
    jc      3f
    call    parse_size
    mov     [ws_bytes], rax
    jmp     8f
3:  lea     rdi, [rip + key_rate]
    call    match_key
    jc      4f
    call    parse_size
    mov     [rate], rax
    jmp     8f
4:  lea     rdi, [rip + key_hb]
    call    match_key
    jc      5f
    call    parse_size
    mov     [hb_ms], rax
    jmp     8f
5:  lea     rdi, [rip + key_cold]
    call    match_key
    jc      6f
    call    parse_size
    mov     [cold_batch], eax
    jmp     8f
6:  lea     rdi, [rip + key_dma]
    call    match_key
    jc      7f
    call    parse_size
    mov     [dma_on], al
    jmp     8f
7:  lea     rdi, [rip + key_cpus]
    call    match_key
    jc      10f
    call    parse_size
    mov     [want_cpus], eax
    jmp     8f
10: lea     rdi, [rip + key_fill]
    call    match_key
    jc      12f
    call    parse_size
    mov     [fill_on], al
    jmp     8f
12: lea     rdi, [rip + key_mark]
    call    match_key
    jc      13f
    call    parse_size
    mov     [mark_on], al
    jmp     8f
13: lea     rdi, [rip + key_tdev]
    call    match_key
    jc      14f
    call    parse_size
    cmp     rax, TDEV_MAX
    jbe     15f
    mov     eax, TDEV_MAX
15: mov     [tdev_count], eax
    jmp     8f
14: lea     rdi, [rip + key_active]
    call    match_key
    jc      8f
    call    parse_size
    cmp     rax, MAX_CPUS
    jbe     16f
    mov     eax, MAX_CPUS
16: mov     [want_active], eax
8:  # skip to the end of the token
    mov     al, [rsi]
    test    al, al
    jz      9f
    cmp     al, ' '
    je      1b
    inc     rsi
    jmp     8b
9:  cmp     byte ptr [fill_on], 0     # unfilled cold memory holds nothing to verify
    jne     11f
    mov     dword ptr [cold_batch], 0
11: ret

# match_key: rsi = token, rdi = "key=" string. CF clear and rsi past the key on a match,
# CF set and rsi unchanged otherwise.
match_key:
    mov     rdx, rsi
1:  mov     al, [rdi]
    test    al, al
    jz      2f
    cmp     al, [rdx]
    jne     3f
    inc     rdi
    inc     rdx
    jmp     1b
2:  mov     rsi, rdx
    clc
    ret
3:  stc
    ret

# parse_size: decimal number at rsi with optional K/M/G suffix -> rax; rsi past it.
parse_size:
    xor     eax, eax
1:  movzx   edx, byte ptr [rsi]
    sub     edx, '0'
    cmp     edx, 9
    ja      2f
    imul    rax, rax, 10
    add     rax, rdx
    inc     rsi
    jmp     1b
2:  movzx   edx, byte ptr [rsi]
    or      edx, 0x20                 # lower case
    cmp     edx, 'k'
    jne     3f
    shl     rax, 10
    inc     rsi
    ret
3:  cmp     edx, 'm'
    jne     4f
    shl     rax, 20
    inc     rsi
    ret
4:  cmp     edx, 'g'
    jne     5f
    shl     rax, 30
    inc     rsi
5:  ret

# ---------------------------------------------------------------------------------------------
# parse_memory: test regions = available memory-map entries clipped to [TEST_BASE, map limit),
# page aligned. Falls back to mem_upper.
parse_memory:
    mov     dword ptr [nregions], 0
    mov     ebx, [mb_info]
    cmp     dword ptr [mb_magic], 0x2BADB002
    jne     .Lpm_default
    test    dword ptr [rbx], 1 << 6
    jz      .Lpm_upper
    mov     esi, [rbx + 48]
    mov     r8d, esi
    add     r8d, [rbx + 44]
.Lpm_next:
    cmp     esi, r8d
    jae     .Lpm_done
    cmp     dword ptr [rsi + 20], 1   # type 1: available
    jne     .Lpm_skip
    mov     rax, [rsi + 4]            # base
    mov     rdx, rax
    add     rdx, [rsi + 12]           # end
    mov     ecx, [map_gib]
    shl     rcx, 30
    cmp     rdx, rcx
    jbe     1f
    mov     rdx, rcx
1:  mov     ecx, TEST_BASE
    cmp     rax, rcx
    jae     2f
    mov     rax, rcx
2:  add     rax, 4095
    and     rax, -4096
    and     rdx, -4096
    cmp     rax, rdx
    jae     .Lpm_skip
    mov     ecx, [nregions]
    cmp     ecx, MAX_REGIONS
    jae     .Lpm_done
    mov     [reg_start + rcx * 8], rax
    mov     [reg_end + rcx * 8], rdx
    inc     dword ptr [nregions]
.Lpm_skip:
    add     esi, [rsi]
    add     esi, 4
    jmp     .Lpm_next
.Lpm_upper:
    test    dword ptr [rbx], 1
    jz      .Lpm_default
    mov     eax, [rbx + 8]            # mem_upper in KiB above 1 MiB
    shl     rax, 10
    add     rax, 0x100000
    jmp     .Lpm_one
.Lpm_default:
    mov     eax, 0x2000000            # no information: assume 32 MiB
.Lpm_one:
    and     rax, -4096
    mov     qword ptr [reg_start], TEST_BASE
    mov     [reg_end], rax
    mov     dword ptr [nregions], 1
.Lpm_done:
    # Sort regions by start (insertion sort; the map may be unordered).
    mov     ecx, 1
.Lsort_outer:
    cmp     ecx, [nregions]
    jae     .Lsort_done
    mov     edx, ecx
.Lsort_inner:
    test    edx, edx
    jz      .Lsort_next
    mov     rax, [reg_start + rdx * 8 - 8]
    cmp     rax, [reg_start + rdx * 8]
    jbe     .Lsort_next
    mov     rsi, [reg_start + rdx * 8]
    mov     [reg_start + rdx * 8 - 8], rsi
    mov     [reg_start + rdx * 8], rax
    mov     rax, [reg_end + rdx * 8 - 8]
    mov     rsi, [reg_end + rdx * 8]
    mov     [reg_end + rdx * 8 - 8], rsi
    mov     [reg_end + rdx * 8], rax
    dec     edx
    jmp     .Lsort_inner
.Lsort_next:
    inc     ecx
    jmp     .Lsort_outer
.Lsort_done:
    # Total pages.
    xor     eax, eax
    xor     ecx, ecx
1:  cmp     ecx, [nregions]
    jae     2f
    mov     rdx, [reg_end + rcx * 8]
    sub     rdx, [reg_start + rcx * 8]
    shr     rdx, 12
    add     rax, rdx
    inc     ecx
    jmp     1b
2:  mov     [mem_total_pages], rax
    # Hot pages: ws rounded down to pages, at most the first region.
    mov     rax, [ws_bytes]
    shr     rax, 12
    mov     rdx, [reg_end]
    sub     rdx, [reg_start]
    shr     rdx, 12
    cmp     dword ptr [nregions], 0
    jne     3f
    xor     edx, edx
3:  cmp     rax, rdx
    jbe     4f
    mov     rax, rdx
4:  mov     [hot_pages], rax
    ret

# calibrate_tsc: count TSC ticks over 10 ms of PIT channel 2 (mode 0, gate via port 0x61).
calibrate_tsc:
    in      al, 0x61
    and     al, 0xFD                  # speaker off
    or      al, 0x01                  # gate on
    out     0x61, al
    mov     al, 0xB0                  # channel 2, lobyte/hibyte, mode 0
    out     0x43, al
    mov     al, 11932 & 0xFF          # 1193182 Hz / 100
    out     0x42, al
    mov     al, 11932 >> 8
    out     0x42, al
    # restart the count: gate low then high
    in      al, 0x61
    and     al, 0xFE
    out     0x61, al
    or      al, 0x01
    out     0x61, al
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     r8, rax
1:  in      al, 0x61
    test    al, 0x20                  # OUT2 goes high when the count reaches 0
    jz      1b
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    sub     rax, r8
    xor     edx, edx
    mov     ecx, 10
    div     rcx
    mov     [tsc_per_ms], rax
    # derived periods
    mov     rcx, [hb_ms]
    imul    rcx, rax
    mov     [hb_ticks], rcx
    mov     rcx, [rate]
    test    rcx, rcx
    jz      2f
    imul    rax, rax, 16000           # TSC ticks per 16 pages = tsc_per_s * 16 / rate
    xor     edx, edx
    div     rcx
    mov     [rate_delay], eax
2:  ret

# start_aps: copy the trampoline, broadcast INIT-SIPI-SIPI, wait for the APs to check in.
start_aps:
    lea     rsi, [rip + trampoline_start]
    mov     edi, TRAMPOLINE
    mov     ecx, trampoline_end - trampoline_start
    rep movsb
    mov     dword ptr [cpus_up], 1
    mov     esi, LAPIC
    mov     eax, [rsi + 0xF0]
    or      eax, 0x100                # software enable
    mov     [rsi + 0xF0], eax
    mov     dword ptr [rsi + 0x310], 0
    mov     dword ptr [rsi + 0x300], 0x000C4500   # INIT, all excluding self
    mov     rdi, 10
    call    delay_ms
    mov     dword ptr [rsi + 0x300], 0x000C4600 | (TRAMPOLINE >> 12)
    mov     rdi, 1
    call    delay_ms
    mov     dword ptr [rsi + 0x300], 0x000C4600 | (TRAMPOLINE >> 12)
    # wait: for want_cpus if given (up to 2 s), else 100 ms
    mov     r9d, [want_cpus]
    mov     rdi, 100
    test    r9d, r9d
    jz      1f
    mov     rdi, 2000
1:  mov     rax, [tsc_per_ms]
    imul    rdi, rax
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    add     rdi, rax                  # deadline
2:  test    r9d, r9d
    jz      3f
    cmp     [cpus_up], r9d
    jae     4f
3:  pause
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    cmp     rax, rdi
    jb      2b
4:  mov     eax, [cpus_up]
    cmp     eax, MAX_CPUS
    jbe     5f
    mov     eax, MAX_CPUS
5:  mov     [ncpus], eax
    test    r9d, r9d
    jz      6f
    cmp     eax, r9d
    je      6f
    lea     rsi, [rip + msg_cpus_fail]
    call    puts_locked_begin
    mov     eax, [ncpus]
    call    put_dec
    lea     rsi, [rip + msg_nl]
    call    puts_locked_end
6:  ret

# delay_ms: busy-wait rdi milliseconds. Clobbers rax, rdx, rdi.
delay_ms:
    imul    rdi, [tsc_per_ms]
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    add     rdi, rax
1:  pause
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    cmp     rax, rdi
    jb      1b
    ret

# compute_slices: split hot pages (in the first region) and cold pages evenly over the active
# CPUs (all of them, or the first active=N).
compute_slices:
    mov     r8d, [ncpus]
    mov     eax, [want_active]
    test    eax, eax
    jz      5f
    cmp     eax, r8d
    jae     5f
    mov     r8d, eax
5:  mov     [nactive], r8d
    mov     r9, [hot_pages]
    mov     r10, [reg_start]
    xor     ecx, ecx
1:  cmp     ecx, r8d
    jae     2f
    mov     rax, r9
    mul     rcx
    div     r8                        # first hot page index of cpu c
    shl     rax, 12
    add     rax, r10
    mov     [hot_lo + rcx * 8], rax
    lea     rax, [rcx + 1]
    mul     r9
    div     r8
    shl     rax, 12
    add     rax, r10
    mov     [hot_hi + rcx * 8], rax
    inc     ecx
    jmp     1b
2:  # cold pages: indices [hot, total) over the region list
    mov     r9, [mem_total_pages]
    sub     r9, [hot_pages]           # cold page count
    xor     ecx, ecx
3:  cmp     ecx, r8d
    jae     4f
    mov     rax, r9
    mul     rcx
    div     r8
    add     rax, [hot_pages]
    call    page_index_to_addr
    mov     [cold_lo + rcx * 8], rax
    mov     [cold_cur + rcx * 8], rax
    lea     rax, [rcx + 1]
    mul     r9
    div     r8
    add     rax, [hot_pages]
    call    page_index_to_addr
    mov     [cold_hi + rcx * 8], rax
    inc     ecx
    jmp     3b
4:  ret

# page_index_to_addr: rax = page index into test memory -> rax = address (end of the last
# region when past the end). Clobbers rdx, rsi, r11.
page_index_to_addr:
    xor     esi, esi
1:  cmp     esi, [nregions]
    jae     3f
    mov     rdx, [reg_end + rsi * 8]
    sub     rdx, [reg_start + rsi * 8]
    shr     rdx, 12
    cmp     rax, rdx
    jb      2f
    sub     rax, rdx
    inc     esi
    jmp     1b
2:  shl     rax, 12
    add     rax, [reg_start + rsi * 8]
    ret
3:  mov     r11d, [nregions]
    test    r11d, r11d
    jz      4f
    mov     rax, [reg_end + r11 * 8 - 8]
    ret
4:  mov     eax, TEST_BASE
    ret

# ---------------------------------------------------------------------------------------------
.section .rodata
.align 8
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF          # 0x08: 32-bit code
    .quad 0x00CF92000000FFFF          # 0x10: data
    .quad 0x00AF9A000000FFFF          # 0x18: 64-bit code
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
msg_boot:      .asciz "\nFERRY-GUEST boot mem="
msg_mib_ws:    .asciz "MiB ws="
msg_mib_tsc:   .asciz "MiB tsc_khz="
msg_ready:     .asciz "\nFERRY-GUEST ready cpus="
msg_status:    .asciz "\nFERRY-GUEST ok sweeps="
msg_fails:     .asciz " fails="
msg_stall:     .asciz " stall_us="
msg_fail:      .asciz "\nFERRY-GUEST FAIL cpu="
msg_addr:      .asciz " addr="
msg_expected:  .asciz " expected="
msg_got:       .asciz " got="
msg_cpus_fail: .asciz "FERRY-GUEST FAIL cpus: only this many answered: "
msg_nl:        .asciz "\n"
key_ws:        .asciz "ws="
key_rate:      .asciz "rate="
key_hb:        .asciz "hb="
key_cold:      .asciz "cold="
key_dma:       .asciz "dma="
key_cpus:      .asciz "cpus="
key_fill:      .asciz "fill="
key_mark:      .asciz "mark="
key_tdev:      .asciz "tdev="
key_active:    .asciz "active="

.section .data
.align 8
ws_bytes:      .quad 16 << 20
rate:          .quad 0
hb_ms:         .quad 1
cold_batch:    .long 256
dma_on:        .byte 0
fill_on:       .byte 1
mark_on:       .byte 0
.align 4
want_cpus:     .long 0
want_active:   .long 0
tdev_count:    .long 0

.section .bss
.align 4096
pml4:          .skip 4096
pdpt:          .skip 4096
pds:           .skip 4096 * MAX_GIB
dma_area:      .skip 4096 * DMA_PAGES
ap_stacks:     .skip STACK_SIZE * MAX_CPUS
boot_stack:    .skip STACK_SIZE
boot_stack_top:
.align 8
mb_magic:      .long 0
mb_info:       .long 0
map_gib:       .long 0
nregions:      .long 0
cpus_up:       .long 0
ncpus:         .long 0
nactive:       .long 0
filled:        .long 0
fails:         .long 0
hb_count:      .long 0
dma_count:     .long 0
rate_delay:    .long 0
go:            .byte 0
print_lock:    .byte 0
.align 8
tsc_per_ms:    .quad 0
hb_ticks:      .quad 0
next_hb:       .quad 0
next_status:   .quad 0
last_tick:     .quad 0
stall_max:     .quad 0
mem_total_pages: .quad 0
hot_pages:     .quad 0
reg_start:     .skip 8 * MAX_REGIONS
reg_end:       .skip 8 * MAX_REGIONS
hot_lo:        .skip 8 * MAX_CPUS
hot_hi:        .skip 8 * MAX_CPUS
cold_lo:       .skip 8 * MAX_CPUS
cold_hi:       .skip 8 * MAX_CPUS
cold_cur:      .skip 8 * MAX_CPUS
gen:           .skip 8 * MAX_CPUS
pace_next:     .skip 8 * MAX_CPUS
dma_vals:      .skip 8 * DMA_PAGES
tdev_cur:      .skip 4 * TDEV_MAX
tdev_vals:     .skip 8 * TDEV_MAX * TDEV_PAGES   # last value written to each device page
