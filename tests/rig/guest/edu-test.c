// edu-test: drives QEMU's `edu` PCI device (1234:11e8) from an aivmm guest's userspace, to
// prove a VFIO passthrough works end to end: BAR access, DMA through the host IOMMU, MSI
// and INTx delivery. Built static by the rig (gcc -static), run as root inside L2.
//
//   edu-test [--reads N]          checks (i)-(iii)
//   edu-test --intx [--deliver]   check (iv); needs uio_pci_generic loaded, runs after (iii)
//
// Prints `EDU-TEST <key>=<value>` lines for the rig to parse, then `EDU-TEST PASS` (or
// `EDU-TEST INTX PASS`) or `EDU-TEST FAIL <reason>`; exit code 0 on pass.
//
// (i)   BAR0 through /sys/bus/pci/devices/<dev>/resource0 (mmap): the identification register
//       (0x00, low byte 0xed) and the liveness register (0x04 reads back inverted).
// (ii)  DMA: a buffer in guest RAM (physical address from /proc/self/pagemap, below the edu's
//       28-bit DMA mask) is copied into the device's buffer (0x40000) and back out to a second
//       page; the bytes must match. The device addresses guest-physical memory, so this works
//       only if the VMM mapped guest RAM into the IOMMU at IOVA = guest-physical.
// (iii) MSI: the device's MSI capability is programmed through sysfs config space with a
//       vector no guest driver owns; the interrupt the device then raises reaches the CPU with
//       no handler, and the kernel logs "No irq handler for vector" with that vector number.
//       That line in /dev/kmsg proves the message travelled device -> host IOMMU interrupt
//       remapping -> VFIO eventfd -> KVM irqfd + MSI route -> guest LAPIC.
// (iv)  INTx routing: uio_pci_generic (bound here with new_id) requests the guest IRQ that
//       the DSDT's _PRT gave the device's slot and pin; its /proc/interrupts line shows the
//       IOAPIC pin and the flow (fasteoi = level-triggered), for the rig to compare with the
//       GSI aivmm wired. With --deliver, INTx delivery too: with MSI off the edu raises its
//       legacy interrupt; uio_pci_generic's handler masks INTx (PCI 2.3 INTx disable in the
//       command register) and counts it, which a read of /dev/uioN returns; the test
//       unmasks INTx again through config space (uio_pci_generic has no irqcontrol). Two
//       rounds, exactly one interrupt each: a line left asserted after the guest's EOI (no
//       resample) would fire again. The nested rig cannot run --deliver: its edu sits behind
//       QEMU's pxb-pcie, whose INTx never reaches L1 (docs/passthrough.md).

#define _GNU_SOURCE
#include <dirent.h>
#include <stdarg.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8

// edu registers (QEMU docs/specs/edu.rst).
#define REG_ID 0x00
#define REG_LIVENESS 0x04
#define REG_IRQ_STATUS 0x24
#define REG_IRQ_RAISE 0x60
#define REG_IRQ_ACK 0x64
#define REG_DMA_SRC 0x80
#define REG_DMA_DST 0x88
#define REG_DMA_COUNT 0x90
#define REG_DMA_CMD 0x98
#define DMA_CMD_START 0x1
#define DMA_CMD_TO_RAM 0x2
#define EDU_BUFFER 0x40000
#define EDU_BUFFER_SIZE 4096
// Bytes per DMA. QEMU's edu requires the end of a transfer to lie strictly inside its
// buffer (a full 4096-byte transfer is refused with a hardware error that stops QEMU).
#define DMA_BYTES 2048
#define EDU_DMA_MASK ((1ull << 28) - 1)

#define PCI_COMMAND 0x04
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_COMMAND_INTX_DISABLE 0x400
#define PCI_STATUS 0x06
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAP_PTR 0x34
#define PCI_CAP_ID_MSI 0x05
#define MSI_FLAGS_ENABLE 0x1
#define MSI_FLAGS_64BIT 0x80

// A vector Linux leaves unused in a small guest: below the system vectors (0xec and up),
// far above where the allocator starts handing out device vectors.
#define TEST_VECTOR 0xd0
#define LAPIC_MSI_ADDR 0xfee00000u

static char dev_dir[300];
static volatile uint8_t *bar0;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("EDU-TEST FAIL ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    exit(1);
}

static uint32_t rd32(uint32_t off) { return *(volatile uint32_t *)(bar0 + off); }
static uint64_t rd64(uint32_t off) { return *(volatile uint64_t *)(bar0 + off); }
static void wr32(uint32_t off, uint32_t v) { *(volatile uint32_t *)(bar0 + off) = v; }
static void wr64(uint32_t off, uint64_t v) { *(volatile uint64_t *)(bar0 + off) = v; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long read_hex_file(const char *path) {
    FILE *f = fopen(path, "r");
    long v = -1;
    if (f) {
        if (fscanf(f, "%li", &v) != 1)
            v = -1;
        fclose(f);
    }
    return v;
}

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        fail("open %s: %s", path, strerror(errno));
    if (write(fd, text, strlen(text)) < 0)
        fail("write %s: %s", path, strerror(errno));
    close(fd);
}

// Config space through sysfs (root may write all of it).
static void cfg_rw(int write_it, off_t off, void *buf, size_t len) {
    char path[400];
    snprintf(path, sizeof(path), "%s/config", dev_dir);
    int fd = open(path, write_it ? O_RDWR : O_RDONLY);
    if (fd < 0)
        fail("open %s: %s", path, strerror(errno));
    ssize_t n = write_it ? pwrite(fd, buf, len, off) : pread(fd, buf, len, off);
    if (n != (ssize_t)len)
        fail("%s config at %#lx: %s", write_it ? "write" : "read", (long)off,
             n < 0 ? strerror(errno) : "short");
    close(fd);
}

static uint8_t cfg8(off_t off) { uint8_t v; cfg_rw(0, off, &v, 1); return v; }
static uint16_t cfg16(off_t off) { uint16_t v; cfg_rw(0, off, &v, 2); return v; }
static void cfg_w16(off_t off, uint16_t v) { cfg_rw(1, off, &v, 2); }
static void cfg_w32(off_t off, uint32_t v) { cfg_rw(1, off, &v, 4); }

static void find_device(void) {
    DIR *d = opendir("/sys/bus/pci/devices");
    if (!d)
        fail("no /sys/bus/pci/devices: %s (is PCI enabled in the guest?)", strerror(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char p[400];
        snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/vendor", e->d_name);
        long vendor = read_hex_file(p);
        snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s/device", e->d_name);
        long device = read_hex_file(p);
        if (vendor == EDU_VENDOR && device == EDU_DEVICE) {
            snprintf(dev_dir, sizeof(dev_dir), "/sys/bus/pci/devices/%s", e->d_name);
            printf("EDU-TEST device=%s\n", e->d_name);
            closedir(d);
            return;
        }
    }
    closedir(d);
    fail("no %04x:%04x device in /sys/bus/pci/devices", EDU_VENDOR, EDU_DEVICE);
}

static void map_bar0(void) {
    char p[400];
    snprintf(p, sizeof(p), "%s/enable", dev_dir);
    write_file(p, "1");
    snprintf(p, sizeof(p), "%s/resource0", dev_dir);
    int fd = open(p, O_RDWR | O_SYNC);
    if (fd < 0)
        fail("open %s: %s", p, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < EDU_BUFFER + EDU_BUFFER_SIZE)
        fail("BAR0 is %ld bytes, the edu's is 1 MiB", (long)st.st_size);
    void *m = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        fail("mmap %s: %s", p, strerror(errno));
    close(fd);
    bar0 = m;
    printf("EDU-TEST bar0_size=%ld\n", (long)st.st_size);
}

// (i) identification and liveness; also times BAR reads (mapped vs trapped figure).
static void check_registers(long reads) {
    uint32_t id = rd32(REG_ID);
    printf("EDU-TEST id=%#010x\n", id);
    if ((id & 0xff) != 0xed)
        fail("identification register %#x does not end in 0xed", id);
    const uint32_t values[] = {0x12345678u, 0u, 0xffffffffu, 0xa5a55a5au};
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
        wr32(REG_LIVENESS, values[i]);
        uint32_t got = rd32(REG_LIVENESS);
        if (got != (uint32_t)~values[i])
            fail("liveness: wrote %#x, read %#x, expected %#x", values[i], got, ~values[i]);
    }
    printf("EDU-TEST liveness=ok\n");
    double t0 = now_s();
    uint32_t sink = 0;
    for (long i = 0; i < reads; i++)
        sink ^= rd32(REG_ID);
    double dt = now_s() - t0;
    if (reads > 0)
        printf("EDU-TEST bar_reads=%ld bar_read_ns=%.0f sink=%u\n", reads, dt * 1e9 / reads,
               sink & 1);
}

// Guest-physical address of the page holding `p` (needs root for the PFN).
static uint64_t phys_addr(void *p) {
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        fail("open /proc/self/pagemap: %s", strerror(errno));
    uint64_t entry;
    long page = sysconf(_SC_PAGESIZE);
    off_t off = (off_t)((uintptr_t)p / page) * 8;
    if (pread(fd, &entry, 8, off) != 8)
        fail("read pagemap: %s", strerror(errno));
    close(fd);
    if (!(entry & (1ull << 63)))
        fail("buffer page not present");
    uint64_t pfn = entry & ((1ull << 55) - 1);
    if (pfn == 0)
        fail("pagemap hides the PFN (not root?)");
    return pfn * page + ((uintptr_t)p % page);
}

static void dma(uint64_t src, uint64_t dst, uint32_t count, uint32_t cmd) {
    wr64(REG_DMA_SRC, src);
    wr64(REG_DMA_DST, dst);
    wr64(REG_DMA_COUNT, count);
    wr64(REG_DMA_CMD, cmd | DMA_CMD_START);
    // The edu runs a DMA 100 ms (virtual) after the command; TCG makes that slower.
    double deadline = now_s() + 60;
    while (rd64(REG_DMA_CMD) & DMA_CMD_START) {
        if (now_s() > deadline)
            fail("DMA %#" PRIx64 " -> %#" PRIx64 " did not finish in 60 s", src, dst);
        usleep(1000);
    }
}

// (ii) RAM -> device -> another RAM page.
static void check_dma(void) {
    long page = sysconf(_SC_PAGESIZE);
    uint8_t *buf = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        fail("mmap DMA buffer: %s", strerror(errno));
    if (mlock(buf, 2 * page) != 0)
        fail("mlock DMA buffer: %s", strerror(errno));
    uint8_t *src = buf, *dst = buf + page;
    for (long i = 0; i < page; i++) {
        src[i] = (uint8_t)(i * 7 + 3);
        dst[i] = 0;
    }
    uint64_t src_pa = phys_addr(src), dst_pa = phys_addr(dst);
    printf("EDU-TEST dma_src_pa=%#" PRIx64 " dma_dst_pa=%#" PRIx64 "\n", src_pa, dst_pa);
    if ((src_pa | dst_pa) & ~EDU_DMA_MASK)
        fail("DMA buffers above the edu's 28-bit DMA mask (guest RAM larger than 256 MiB?)");

    uint16_t cmd = cfg16(PCI_COMMAND);
    cfg_w16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);

    uint32_t count = DMA_BYTES;
    dma(src_pa, EDU_BUFFER, count, 0);
    dma(EDU_BUFFER, dst_pa, count, DMA_CMD_TO_RAM);
    for (uint32_t i = 0; i < count; i++) {
        if (dst[i] != src[i])
            fail("DMA copy differs at byte %u: %#x, expected %#x", i, dst[i], src[i]);
    }
    printf("EDU-TEST dma=ok bytes=%u\n", count);
    munmap(buf, 2 * page);
}

static int find_msi_cap(void) {
    if (!(cfg16(PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return -1;
    int ptr = cfg8(PCI_CAP_PTR) & 0xfc;
    for (int n = 0; ptr && n < 48; n++) {
        if (cfg8(ptr) == PCI_CAP_ID_MSI)
            return ptr;
        ptr = cfg8(ptr + 1) & 0xfc;
    }
    return -1;
}

// True when the kernel log, read from `fd` onwards, has the no-handler line for `vector`.
static int kmsg_has_vector(int fd, unsigned vector) {
    char rec[2048], want[32];
    snprintf(want, sizeof(want), ".%u No irq handler", vector);
    for (;;) {
        ssize_t n = read(fd, rec, sizeof(rec) - 1);
        if (n < 0) {
            if (errno == EPIPE)
                continue; // overwritten records: keep reading
            return 0;     // EAGAIN: nothing more
        }
        rec[n] = 0;
        if (strstr(rec, want))
            return 1;
    }
}

// (iii) MSI with a vector no driver owns, observed in the kernel log.
static void check_msi(void) {
    int cap = find_msi_cap();
    if (cap < 0)
        fail("the device shows no MSI capability");
    uint16_t flags = cfg16(cap + 2);
    int data_off = (flags & MSI_FLAGS_64BIT) ? 0xc : 0x8;
    cfg_w32(cap + 4, LAPIC_MSI_ADDR); // destination APIC 0, physical, fixed delivery
    if (flags & MSI_FLAGS_64BIT)
        cfg_w32(cap + 8, 0);
    cfg_w16(cap + data_off, TEST_VECTOR);
    cfg_w16(cap + 2, (flags & ~0x70) | MSI_FLAGS_ENABLE);
    printf("EDU-TEST msi_cap=%#x vector=%#x\n", cap, TEST_VECTOR);

    int kmsg = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);
    if (kmsg < 0)
        fail("open /dev/kmsg: %s", strerror(errno));
    lseek(kmsg, 0, SEEK_END);

    int seen = 0;
    for (int attempt = 0; attempt < 5 && !seen; attempt++) {
        wr32(REG_IRQ_RAISE, 1u << attempt);
        double deadline = now_s() + 10;
        while (!(seen = kmsg_has_vector(kmsg, TEST_VECTOR)) && now_s() < deadline)
            usleep(10000);
        printf("EDU-TEST irq_status=%#x\n", rd32(REG_IRQ_STATUS));
        wr32(REG_IRQ_ACK, 0xffffffffu);
    }
    close(kmsg);
    cfg_w16(cap + 2, flags & ~MSI_FLAGS_ENABLE);
    if (!seen)
        fail("no interrupt arrived on vector %#x (no 'No irq handler for vector' line)",
             TEST_VECTOR);
    printf("EDU-TEST msi=ok\n");
}

// The uio device file of the edu, binding it to uio_pci_generic first; opened read-write.
static int open_uio(void) {
    char p[400], link[400];
    snprintf(p, sizeof(p), "%s/driver", dev_dir);
    ssize_t n = readlink(p, link, sizeof(link) - 1);
    if (n >= 0) {
        link[n] = 0;
        const char *name = strrchr(link, '/');
        if (strcmp(name ? name + 1 : link, "uio_pci_generic") != 0)
            fail("intx: the device is bound to %s, not uio_pci_generic", link);
    } else {
        write_file("/sys/bus/pci/drivers/uio_pci_generic/new_id", "1234 11e8");
    }
    double deadline = now_s() + 10;
    for (;;) {
        snprintf(p, sizeof(p), "%s/uio", dev_dir);
        DIR *d = opendir(p);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (strncmp(e->d_name, "uio", 3) != 0)
                continue;
            char node[300];
            snprintf(node, sizeof(node), "/dev/%s", e->d_name);
            int fd = open(node, O_RDWR);
            if (fd >= 0) {
                printf("EDU-TEST intx_uio=%s\n", node);
                closedir(d);
                return fd;
            }
        }
        if (d)
            closedir(d);
        if (now_s() > deadline)
            fail("intx: no uio device for %s (uio_pci_generic did not bind or has no node)",
                 dev_dir);
        usleep(20000);
    }
}

// The /proc/interrupts line of `irq`, runs of blanks squeezed to one; "" if there is none.
static void interrupts_line(long irq, char *out, size_t len) {
    out[0] = 0;
    FILE *f = fopen("/proc/interrupts", "r");
    if (!f)
        return;
    char line[1024];
    while (fgets(line, sizeof(line), f)) {
        char *s = line, *end;
        while (*s == ' ')
            s++;
        long n = strtol(s, &end, 10);
        if (end == s || *end != ':' || n != irq)
            continue;
        size_t o = 0;
        for (char *c = s; *c && *c != '\n' && o + 1 < len; c++) {
            if ((*c == ' ' || *c == '\t') && (o == 0 || out[o - 1] == ' '))
                continue;
            out[o++] = (*c == '\t') ? ' ' : *c;
        }
        out[o] = 0;
        break;
    }
    fclose(f);
}

// (iv) INTx routing, and with `deliver` two rounds of delivery.
static void check_intx(int deliver) {
    int cap = find_msi_cap();
    if (cap >= 0) {
        uint16_t flags = cfg16(cap + 2);
        if (flags & MSI_FLAGS_ENABLE)
            cfg_w16(cap + 2, flags & ~MSI_FLAGS_ENABLE);
    }
    int fd = open_uio();
    char p[400];
    snprintf(p, sizeof(p), "%s/irq", dev_dir);
    long irq = read_hex_file(p);
    printf("EDU-TEST intx_irq=%ld\n", irq);
    char line[512];
    interrupts_line(irq, line, sizeof(line));
    printf("EDU-TEST intx_line=%s\n", line);
    if (!line[0])
        fail("intx: guest IRQ %ld is not in /proc/interrupts (uio_pci_generic has no IRQ?)",
             irq);
    uint32_t last = 0;
    for (int round = 0; deliver && round < 2; round++) {
        cfg_w16(PCI_COMMAND, cfg16(PCI_COMMAND) & ~PCI_COMMAND_INTX_DISABLE);
        wr32(REG_IRQ_RAISE, 0x100u << round);
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int ready = poll(&pfd, 1, 30000);
        uint32_t status = rd32(REG_IRQ_STATUS);
        if (ready <= 0)
            fail("intx: round %d: no interrupt on guest IRQ %ld within 30 s (edu status %#x)",
                 round, irq, status);
        uint32_t events;
        if (read(fd, &events, sizeof(events)) != sizeof(events))
            fail("intx: reading the uio event count: %s", strerror(errno));
        // The handler masked INTx; give a stuck line a moment to show up as more events.
        usleep(200000);
        uint32_t more;
        if (poll(&pfd, 1, 0) > 0 && read(fd, &more, sizeof(more)) == sizeof(more))
            events = more;
        int masked = (cfg16(PCI_COMMAND) & PCI_COMMAND_INTX_DISABLE) != 0;
        printf("EDU-TEST intx_round=%d events=%u irq_status=%#x masked=%d\n", round, events,
               status, masked);
        if (events != last + 1)
            fail("intx: round %d: the event count went from %u to %u, expected one interrupt",
                 round, last, events);
        last = events;
        wr32(REG_IRQ_ACK, status);
    }
    close(fd);
    if (deliver) {
        interrupts_line(irq, line, sizeof(line));
        printf("EDU-TEST intx_line_after=%s\n", line);
        printf("EDU-TEST intx_delivery=ok\n");
    }
    printf("EDU-TEST intx=ok\n");
}

int main(int argc, char **argv) {
    long reads = 100000;
    int intx = 0, deliver = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reads") && i + 1 < argc)
            reads = strtol(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--intx"))
            intx = 1;
        else if (!strcmp(argv[i], "--deliver"))
            deliver = 1;
        else
            fail("usage: edu-test [--reads N] | edu-test --intx [--deliver]");
    }
    if (deliver && !intx)
        fail("--deliver goes with --intx");
    setvbuf(stdout, NULL, _IOLBF, 0);
    find_device();
    map_bar0();
    if (intx) {
        check_intx(deliver);
        printf("EDU-TEST INTX PASS\n");
        return 0;
    }
    check_registers(reads);
    check_dma();
    check_msi();
    printf("EDU-TEST PASS\n");
    return 0;
}
