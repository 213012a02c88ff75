#include "ferry_aead.h"

#include <CCryptoBoringSSL_aead.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { TAG = 16 };

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ volatile("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/// One frame's work, shared by the caller and the helper (each takes a range of records).
struct frame_job {
    int sealing;
    uint64_t sequence;
    size_t record_bytes, records, body_length;
    const uint8_t *ad; size_t ad_length;
    // sealing: metadata (in place) ‖ payload -> out
    uint8_t *metadata; size_t metadata_length;
    const uint8_t *payload; uint8_t *out;
    // opening: sealed -> out
    const uint8_t *sealed;
};

/// The records of the frame in progress, taken one at a time by whichever thread is free.
struct frame_claims {
    const struct frame_job *job;
    atomic_size_t next;          // the next record nobody has taken
    atomic_int failed;
};

struct ferry_aead {
    EVP_AEAD_CTX *context;
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    pthread_t helper;
    int parallel;                // whether a helper may be started
    int helper_state;            // 0 not started, 1 running, -1 could not start (serial from then on)
    int stopping;
    // Under `lock`: a frame offered to the helper and not yet picked up, and whether the helper is
    // working on one (the caller returns only when it is not).
    struct frame_claims *offered;
    atomic_int busy;             // written under `lock`; the caller may poll it without

};

ferry_aead *ferry_aead_new(int suite, const uint8_t *key, size_t key_length, int parallel) {
    const EVP_AEAD *algorithm = suite == FERRY_AEAD_AES_256_GCM ? EVP_aead_aes_256_gcm()
                              : suite == FERRY_AEAD_CHACHA20_POLY1305 ? EVP_aead_chacha20_poly1305() : NULL;
    if (algorithm == NULL || key_length != EVP_AEAD_key_length(algorithm)) return NULL;
    ferry_aead *aead = calloc(1, sizeof *aead);
    if (aead == NULL) return NULL;
    aead->parallel = parallel;
    aead->context = EVP_AEAD_CTX_new(algorithm, key, key_length, TAG);
    if (aead->context == NULL) { free(aead); return NULL; }
    pthread_mutex_init(&aead->lock, NULL);
    pthread_cond_init(&aead->wake, NULL);
    pthread_cond_init(&aead->done, NULL);
    return aead;
}

void ferry_aead_free(ferry_aead *aead) {
    if (aead == NULL) return;
    if (aead->helper_state == 1) {
        pthread_mutex_lock(&aead->lock);
        aead->stopping = 1;
        pthread_cond_signal(&aead->wake);
        pthread_mutex_unlock(&aead->lock);
        pthread_join(aead->helper, NULL);
    }
    pthread_cond_destroy(&aead->done);
    pthread_cond_destroy(&aead->wake);
    pthread_mutex_destroy(&aead->lock);
    EVP_AEAD_CTX_free(aead->context);
    free(aead);
}

static void record_nonce(uint8_t nonce[12], size_t record, uint64_t sequence) {
    uint32_t index = (uint32_t)record;
    for (int i = 0; i < 4; i++) nonce[i] = (uint8_t)(index >> (8 * i));
    for (int i = 0; i < 8; i++) nonce[4 + i] = (uint8_t)(sequence >> (8 * i));
}

/// Seals or opens records [first, last) of `job`. 1 if all succeeded.
static int run_records(const EVP_AEAD_CTX *context, const struct frame_job *job, size_t first, size_t last) {
    uint8_t nonce[12];
    for (size_t record = first; record < last; record++) {
        size_t start = record * job->record_bytes;
        size_t length = job->body_length - start < job->record_bytes ? job->body_length - start : job->record_bytes;
        size_t sealed_at = record * (job->record_bytes + TAG);   // from the body's first byte on the wire
        record_nonce(nonce, record, job->sequence);
        if (job->sealing) {
            size_t written = 0;
            if (record == 0) {
                // The metadata in place; the payload's share of record 0 and the tag to `out`.
                size_t extra = length - job->metadata_length;
                if (!EVP_AEAD_CTX_seal_scatter(context, job->metadata, job->out, &written, extra + TAG, nonce, 12,
                                               job->metadata, job->metadata_length, job->payload, extra,
                                               job->ad, job->ad_length) || written != extra + TAG) return 0;
            } else {
                uint8_t *out = job->out + sealed_at - job->metadata_length;
                if (!EVP_AEAD_CTX_seal(context, out, &written, length + TAG, nonce, 12,
                                       job->payload + start - job->metadata_length, length,
                                       job->ad, job->ad_length) || written != length + TAG) return 0;
            }
        } else {
            const uint8_t *in = job->sealed + sealed_at;
            if (!EVP_AEAD_CTX_open_gather(context, job->out + start, nonce, 12, in, length, in + length, TAG,
                                          job->ad, job->ad_length)) return 0;
        }
    }
    return 1;
}

/// Takes records of `claims` one by one until none is left.
static void take_records(const EVP_AEAD_CTX *context, struct frame_claims *claims) {
    size_t records = claims->job->records;
    for (;;) {
        size_t record = atomic_fetch_add_explicit(&claims->next, 1, memory_order_relaxed);
        if (record >= records) return;
        if (!run_records(context, claims->job, record, record + 1)) atomic_store(&claims->failed, 1);
    }
}

static void *helper_main(void *argument) {
    ferry_aead *aead = argument;
    pthread_mutex_lock(&aead->lock);
    for (;;) {
        while (aead->offered == NULL && !aead->stopping) pthread_cond_wait(&aead->wake, &aead->lock);
        if (aead->stopping) break;
        struct frame_claims *claims = aead->offered;
        aead->offered = NULL;
        atomic_store_explicit(&aead->busy, 1, memory_order_relaxed);
        pthread_mutex_unlock(&aead->lock);
        take_records(aead->context, claims);
        pthread_mutex_lock(&aead->lock);
        atomic_store_explicit(&aead->busy, 0, memory_order_release);
        pthread_cond_signal(&aead->done);
    }
    pthread_mutex_unlock(&aead->lock);
    return NULL;
}

/// Starts the helper on first use: only where a second core exists, and never fatally.
static int helper_ready(ferry_aead *aead) {
    if (aead->helper_state == 0) {
        aead->helper_state = -1;
        if (aead->parallel && sysconf(_SC_NPROCESSORS_ONLN) > 1) {
            pthread_attr_t attributes;
            pthread_attr_init(&attributes);
            pthread_attr_setstacksize(&attributes, 256 << 10);
            if (pthread_create(&aead->helper, &attributes, helper_main, aead) == 0) aead->helper_state = 1;
            pthread_attr_destroy(&attributes);
        }
    }
    return aead->helper_state == 1;
}

/// Runs `job`. A frame of two records or more is offered to the helper, and both threads take its
/// records one at a time: where the helper gets no core in time, this thread does them all, and
/// withdraws the offer; it never waits for a helper that has not started.
static int run_frame(ferry_aead *aead, const struct frame_job *job) {
    if (job->records < 2 || !helper_ready(aead)) return run_records(aead->context, job, 0, job->records);
    struct frame_claims claims = { .job = job };
    atomic_init(&claims.next, 0);
    atomic_init(&claims.failed, 0);
    pthread_mutex_lock(&aead->lock);
    aead->offered = &claims;
    pthread_cond_signal(&aead->wake);
    pthread_mutex_unlock(&aead->lock);
    take_records(aead->context, &claims);
    pthread_mutex_lock(&aead->lock);
    if (aead->offered == &claims) aead->offered = NULL;
    int helping = atomic_load_explicit(&aead->busy, memory_order_relaxed);
    pthread_mutex_unlock(&aead->lock);
    // The helper has at most one record left (about 50 us): wait for it awake rather than asleep,
    // since waking a thread whose core went idle costs hundreds of microseconds in a VM.
    if (helping) {
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (unsigned spins = 1; atomic_load_explicit(&aead->busy, memory_order_acquire); spins++) {
            CPU_RELAX();
            if (spins % 256 == 0) {
                clock_gettime(CLOCK_MONOTONIC, &now);
                if ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) > 1000000L) break;
            }
        }
        pthread_mutex_lock(&aead->lock);
        while (atomic_load_explicit(&aead->busy, memory_order_acquire)) pthread_cond_wait(&aead->done, &aead->lock);
        pthread_mutex_unlock(&aead->lock);
    }
    return !atomic_load(&claims.failed);
}

int ferry_aead_seal_frame(ferry_aead *aead, uint64_t sequence, size_t record_bytes,
                          const uint8_t *ad, size_t ad_length,
                          uint8_t *metadata, size_t metadata_length,
                          const uint8_t *payload, size_t payload_length, uint8_t *out) {
    if (record_bytes == 0 || metadata_length > record_bytes) return 0;
    size_t body = metadata_length + payload_length;
    struct frame_job job = {
        .sealing = 1, .sequence = sequence, .record_bytes = record_bytes,
        .records = body == 0 ? 1 : (body + record_bytes - 1) / record_bytes, .body_length = body,
        .ad = ad, .ad_length = ad_length, .metadata = metadata, .metadata_length = metadata_length,
        .payload = payload, .out = out,
    };
    return run_frame(aead, &job);
}

int ferry_aead_open_frame(ferry_aead *aead, uint64_t sequence, size_t record_bytes, size_t records,
                          const uint8_t *ad, size_t ad_length,
                          const uint8_t *sealed, size_t sealed_length, uint8_t *out) {
    if (record_bytes == 0 || records == 0 || sealed_length < records * TAG) return 0;
    struct frame_job job = {
        .sealing = 0, .sequence = sequence, .record_bytes = record_bytes, .records = records,
        .body_length = sealed_length - records * TAG, .ad = ad, .ad_length = ad_length,
        .sealed = sealed, .out = out,
    };
    if ((job.body_length + record_bytes - 1) / record_bytes != records && !(job.body_length == 0 && records == 1)) return 0;
    return run_frame(aead, &job);
}
