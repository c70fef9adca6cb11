/* The disk tier's chunk-file reader in C: open, read (O_DIRECT where asked), check the crc32c, check the
 * size header and decode the LZ4 block into the caller's buffer, for a list of chunk files, in one call
 * that needs no Python. tierkv/tiers/_native.py compiles this file with the system C compiler on first
 * use and calls it through ctypes, which lets go of the GIL for the whole call: reader threads then
 * run side by side instead of queueing for the GIL five times per chunk. The Python reader in
 * tierkv/tiers/_diskio.py is the reference: every outcome here (the bytes, and which check fails)
 * must be the same as there; tests/test_disk_native.py holds the two together.
 *
 * File layout (tierkv/tiers/_diskio.py):  [u32 LE n][LZ4 block of n bytes][u32 LE crc32c of all before it]
 *
 * Plain C99 + POSIX; the crc uses the SSE4.2 crc32 instruction where the CPU has it (checked at run time),
 * else tables. No heap memory is allocated; nothing is written outside outs[i][0, nbytes[i]) and the
 * scratch buffer the caller passes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TKV_ABI 3

/* per-chunk status codes (tierkv/tiers/_native.py maps them to errors) */
enum {
    TKV_OK = 0,
    TKV_OPEN_FAILED = 1,   /* info0 = errno of open() */
    TKV_READ_FAILED = 2,   /* info0 = errno of read() */
    TKV_TOO_LONG = 3,      /* the file is longer than any valid file of nbytes */
    TKV_TOO_SHORT = 4,     /* info0 = file size */
    TKV_BAD_CRC = 5,       /* info0 = file size, info1 = stored crc, info2 = computed crc */
    TKV_BAD_HEADER = 6,    /* info0 = the size the header gives */
    TKV_BAD_BLOCK = 7,     /* the LZ4 block does not decode to exactly nbytes */
    TKV_SCRATCH_SMALL = 8, /* the caller's scratch buffer cannot hold the read (a caller bug) */
};

#define HEADER 4
#define CRC 4
#define DIRECT_ALIGN 4096

int tkv_abi(void) { return TKV_ABI; }

/* ---- crc32c (Castagnoli, reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF) ---- */
static uint32_t crc_table[8][256];
static int crc_hw = -1; /* -1: not probed yet */

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (uint32_t i = 0; i < 256; i++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

static uint32_t crc_sw(uint32_t c, const uint8_t *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) { c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xFF]; n--; }
    while (n >= 8) { /* eight bytes per round, one table per byte position */
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;
        c = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^ crc_table[5][(w >> 16) & 0xFF] ^
            crc_table[4][(w >> 24) & 0xFF] ^ crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
            crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][(w >> 56) & 0xFF];
        p += 8;
        n -= 8;
    }
    while (n--) c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xFF];
    return c;
}

/* The raw crc register is linear over GF(2): crc(c, A || B) = shift(crc(c, A), |B|) ^ crc(0, B), where
 * shift(x, n) is x carried across n zero bytes. Carrying across BLOCK bytes is a fixed 32x32 bit matrix,
 * built once by squaring the one-bit step, and applied as four byte tables. */
#define BLOCK 4096
static uint32_t shift_table[4][256];

static uint32_t gf2_times(const uint32_t *m, uint32_t v) {
    uint32_t r = 0;
    for (int j = 0; v; j++, v >>= 1)
        if (v & 1) r ^= m[j];
    return r;
}

static void shift_init(void) {
    uint32_t op[32], sq[32];
    op[0] = 0x82F63B78u; /* one zero bit: bit 0 falls out and brings the polynomial in */
    for (int i = 1; i < 32; i++) op[i] = 1u << (i - 1);
    for (int bits = 1; bits < 8 * BLOCK; bits *= 2) { /* BLOCK is a power of two */
        for (int i = 0; i < 32; i++) sq[i] = gf2_times(op, op[i]);
        memcpy(op, sq, sizeof op);
    }
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) shift_table[k][b] = gf2_times(op, b << (8 * k));
}

static uint32_t shift_block(uint32_t x) {
    return shift_table[0][x & 0xFF] ^ shift_table[1][(x >> 8) & 0xFF] ^ shift_table[2][(x >> 16) & 0xFF] ^
           shift_table[3][x >> 24];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TKV_HW_CRC 1
/* The crc32 instruction has a latency of three cycles and a throughput of one: three streams over three
 * neighbouring blocks keep it busy, and are then merged with shift_block. */
__attribute__((target("sse4.2"))) static uint32_t crc_hw_run(uint32_t c, const uint8_t *p, size_t n) {
    uint64_t c64 = c;
    while (n && ((uintptr_t)p & 7)) { c64 = __builtin_ia32_crc32qi((uint32_t)c64, *p++); n--; }
    while (n >= 3 * BLOCK) {
        uint64_t a = c64, b = 0, d = 0;
        for (size_t k = 0; k < BLOCK; k += 8) {
            uint64_t wa, wb, wd;
            memcpy(&wa, p + k, 8);
            memcpy(&wb, p + BLOCK + k, 8);
            memcpy(&wd, p + 2 * BLOCK + k, 8);
            a = __builtin_ia32_crc32di(a, wa);
            b = __builtin_ia32_crc32di(b, wb);
            d = __builtin_ia32_crc32di(d, wd);
        }
        c64 = shift_block(shift_block((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)d;
        p += 3 * BLOCK;
        n -= 3 * BLOCK;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    while (n--) c64 = __builtin_ia32_crc32qi((uint32_t)c64, *p++);
    return (uint32_t)c64;
}
#endif

static uint32_t crc32c(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
#ifdef TKV_HW_CRC
    if (crc_hw > 0) return crc_hw_run(c, p, n) ^ 0xFFFFFFFFu;
#endif
    return crc_sw(c, p, n) ^ 0xFFFFFFFFu;
}

/* exported for the tests: the same crc the reader checks */
uint32_t tkv_crc32c(const uint8_t *p, size_t n, int force_table) {
    if (force_table) return crc_sw(0xFFFFFFFFu, p, n) ^ 0xFFFFFFFFu;
    return crc32c(p, n);
}

int tkv_crc_hardware(void) { return crc_hw > 0; }

void tkv_init(void) {
    crc_init();
    shift_init();
#ifdef TKV_HW_CRC
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    crc_hw = 0;
#endif
}

/* ---- LZ4 block decoding: sequences of [token][literal length+][literals][offset LE16][match length+];
 * the last sequence has literals only. Every length and offset is checked against both buffers. ---- */
static int read_length(const uint8_t **ip, const uint8_t *iend, size_t *len) {
    unsigned b;
    do {
        if (*ip >= iend) return -1;
        b = *(*ip)++;
        *len += b;
    } while (b == 255);
    return 0;
}

int tkv_lz4_decode(const uint8_t *src, size_t srclen, uint8_t *dst, size_t dstlen) {
    const uint8_t *ip = src, *const iend = src + srclen;
    uint8_t *op = dst, *const oend = dst + dstlen;
    for (;;) {
        if (ip >= iend) return -1;
        unsigned token = *ip++;
        size_t lit = token >> 4;
        if (lit == 15 && read_length(&ip, iend, &lit)) return -1;
        if (lit > (size_t)(iend - ip) || lit > (size_t)(oend - op)) return -1;
        memcpy(op, ip, lit);
        op += lit;
        ip += lit;
        if (ip == iend) break; /* the last sequence ends with its literals */
        if (iend - ip < 2) return -1;
        size_t off = (size_t)ip[0] | ((size_t)ip[1] << 8);
        ip += 2;
        size_t ml = token & 15;
        if (ml == 15 && read_length(&ip, iend, &ml)) return -1;
        ml += 4;
        if (off == 0 || off > (size_t)(op - dst) || ml > (size_t)(oend - op)) return -1;
        if (off >= ml) {
            memcpy(op, op - off, ml);
        } else {
            /* an overlapping match repeats the last `off` bytes: copy whole periods, the distance
             * doubling while it stays a multiple of off and inside what is already written */
            size_t done = 0, dist = off;
            while (done < ml) {
                size_t n = ml - done < dist ? ml - done : dist;
                memcpy(op + done, op + done - dist, n);
                done += n;
                if (2 * dist <= done + off) dist *= 2;
            }
        }
        op += ml;
    }
    return op == oend ? 0 : -1;
}

/* ---- one chunk file ---- */
static size_t max_file_size(size_t nbytes) { return nbytes + nbytes / 255 + 16 + HEADER + CRC; }

static int read_one(const char *path, int64_t nbytes, int64_t expect, uint8_t *out, int direct, uint8_t *scratch,
                    int64_t scratch_len, int64_t *info) {
    size_t cap = max_file_size((size_t)nbytes) + 1; /* one byte more than any valid file */
    size_t want = direct ? (cap + DIRECT_ALIGN - 1) / DIRECT_ALIGN * DIRECT_ALIGN : cap;
    if ((int64_t)want > scratch_len) return TKV_SCRATCH_SMALL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
    if (fd < 0) {
        info[0] = errno;
        return TKV_OPEN_FAILED;
    }
    size_t got = 0;
    for (;;) {
        ssize_t r = read(fd, scratch + got, want - got);
        if (r < 0) {
            if (errno == EINTR) continue;
            info[0] = errno;
            close(fd);
            return TKV_READ_FAILED;
        }
        if (r == 0) break;
        got += (size_t)r;
        if ((int64_t)got == expect && got < want) break; /* the size the index knows, with room to spare: the end */
        if (got >= want || (direct && got % DIRECT_ALIGN)) break; /* full, or a short O_DIRECT block: the end */
    }
    close(fd);
    if (got >= cap) return TKV_TOO_LONG;
    info[0] = (int64_t)got;
    if (got < HEADER + CRC) return TKV_TOO_SHORT;
    size_t body = got - CRC;
    uint32_t stored = (uint32_t)scratch[body] | ((uint32_t)scratch[body + 1] << 8) | ((uint32_t)scratch[body + 2] << 16) |
                      ((uint32_t)scratch[body + 3] << 24);
    uint32_t computed = crc32c(scratch, body);
    if (stored != computed) {
        info[1] = stored;
        info[2] = computed;
        return TKV_BAD_CRC;
    }
    uint32_t size = (uint32_t)scratch[0] | ((uint32_t)scratch[1] << 8) | ((uint32_t)scratch[2] << 16) | ((uint32_t)scratch[3] << 24);
    if ((int64_t)size != nbytes) {
        info[0] = size;
        return TKV_BAD_HEADER;
    }
    if (tkv_lz4_decode(scratch + HEADER, body - HEADER, out, (size_t)nbytes)) return TKV_BAD_BLOCK;
    info[0] = (int64_t)got;
    return TKV_OK;
}

/* Read chunk files paths[0..n) (each holding nbytes[i] raw bytes; expect[i] = the file size the caller
 * knows, or -1) into outs[i]. status[i] gets a TKV_* code and info[3 * i ..] its details (on success
 * info[3 * i] = the file size). Returns how many failed. O_DIRECT: `scratch` must be aligned to 4096
 * bytes and hold round_up(max_file_size(max nbytes) + 1, 4096) bytes. With stop_on_error it returns at
 * the first failure (the later entries keep status -1: not read). */
int tkv_read_chunks(int n, const char *const *paths, const int64_t *nbytes, const int64_t *expect, uint8_t *const *outs,
                    int direct, uint8_t *scratch, int64_t scratch_len, int32_t *status, int64_t *info, int stop_on_error) {
    int failed = 0;
    for (int i = 0; i < n; i++) status[i] = -1;
    for (int i = 0; i < n; i++) {
        info[3 * i] = info[3 * i + 1] = info[3 * i + 2] = 0;
        status[i] = read_one(paths[i], nbytes[i], expect[i], outs[i], direct, scratch, scratch_len, info + 3 * i);
        if (status[i] != TKV_OK) {
            failed++;
            if (stop_on_error) break;
        }
    }
    return failed;
}

/* tkv_read_chunks over `threads` threads of its own (the caller's among them), each with an aligned
 * scratch buffer of scratch_len bytes, taking the next unread entry until none is left: one foreign
 * call reads a whole batch in parallel, so a Python caller holds the GIL only to set it up. Every entry
 * is tried (no stop at the first failure); returns how many failed, or -1 when entries were left
 * unread because no thread could allocate its scratch buffer (the caller reads them again). */
struct mt_job {
    int n, direct;
    const char *const *paths;
    const int64_t *nbytes, *expect;
    uint8_t *const *outs;
    int64_t scratch_len;
    int32_t *status;
    int64_t *info;
    int next;
    int failed;
};

static void *mt_worker(void *arg) {
    struct mt_job *job = (struct mt_job *)arg;
    void *scratch = NULL;
    if (posix_memalign(&scratch, DIRECT_ALIGN, (size_t)job->scratch_len)) return (void *)1;
    for (;;) {
        int i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (i >= job->n) break;
        int64_t *info = job->info + 3 * i;
        info[0] = info[1] = info[2] = 0;
        job->status[i] = read_one(job->paths[i], job->nbytes[i], job->expect[i], job->outs[i], job->direct,
                                  (uint8_t *)scratch, job->scratch_len, info);
        if (job->status[i] != TKV_OK) __atomic_fetch_add(&job->failed, 1, __ATOMIC_RELAXED);
    }
    free(scratch);
    return NULL;
}

static int run_mt(struct mt_job *job, int threads) {
    enum { MAX_THREADS = 64 };
    pthread_t tids[MAX_THREADS];
    for (int i = 0; i < job->n; i++) job->status[i] = -1;
    if (threads > job->n) threads = job->n;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[started], NULL, mt_worker, job)) break; /* fewer threads: still correct */
        started++;
    }
    mt_worker(job);
    for (int t = 0; t < started; t++) pthread_join(tids[t], NULL);
    for (int i = 0; i < job->n; i++)
        if (job->status[i] == -1) return -1; /* no worker got a scratch buffer: entries left unread */
    return job->failed;
}

int tkv_read_chunks_mt(int n, const char *const *paths, const int64_t *nbytes, const int64_t *expect,
                       uint8_t *const *outs, int direct, int64_t scratch_len, int32_t *status, int64_t *info,
                       int threads) {
    struct mt_job job = {n, direct, paths, nbytes, expect, outs, scratch_len, status, info, 0, 0};
    return run_mt(&job, threads);
}

/* tkv_read_chunks_mt started on a thread of its own, returning at once: the caller (a Python decode
 * thread) goes on with other work while the batch is read, with no Python thread in between (a reader
 * thread of Python's takes the GIL to pick up the work and to hand back the result, and the decode
 * thread queues behind it). The arrays passed must stay alive and unchanged until tkv_read_wait, which
 * must be called exactly once per handle. Returns NULL when the thread cannot be started (nothing was
 * read: the caller reads the batch another way). */
struct async_read {
    struct mt_job job;
    int threads, result;
    pthread_t tid;
};

static void *async_main(void *arg) {
    struct async_read *a = (struct async_read *)arg;
    a->result = run_mt(&a->job, a->threads);
    return NULL;
}

void *tkv_read_start(int n, const char *const *paths, const int64_t *nbytes, const int64_t *expect,
                     uint8_t *const *outs, int direct, int64_t scratch_len, int32_t *status, int64_t *info,
                     int threads) {
    struct async_read *a = (struct async_read *)malloc(sizeof *a);
    if (!a) return NULL;
    struct mt_job job = {n, direct, paths, nbytes, expect, outs, scratch_len, status, info, 0, 0};
    a->job = job;
    a->threads = threads;
    a->result = -1;
    if (pthread_create(&a->tid, NULL, async_main, a)) {
        free(a);
        return NULL;
    }
    return a;
}

/* Wait for a batch tkv_read_start started and free its handle; returns what tkv_read_chunks_mt would. */
int tkv_read_wait(void *handle) {
    struct async_read *a = (struct async_read *)handle;
    pthread_join(a->tid, NULL);
    int r = a->result;
    free(a);
    return r;
}
