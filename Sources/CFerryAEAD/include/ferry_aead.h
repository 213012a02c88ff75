// Frame sealing with BoringSSL's EVP_AEAD, as vendored by swift-crypto (its CCryptoBoringSSL
// target, linked into every agent through the Crypto product). swift-crypto's Swift API allocates
// the ciphertext on every call; the link seals a frame's payload straight into the sender's reused
// buffer and opens frames into the receiver's, so it calls the same library's C API here. BoringSSL
// picks its fastest AES-GCM at run time: VAES + VPCLMULQDQ on AVX2 where the CPU has them (about
// 1.8x OpenSSL 3.0's AES-NI code on this machine's AMD EPYC, ferry-bench seal).
//
// A frame's body (metadata ‖ payload) is sealed as records of `record_bytes` (the last one
// shorter), each with its own tag right after it and its own nonce: the record's index (32 bits)
// and the frame's sequence number (64 bits), little-endian. The records of a large frame are
// sealed or opened by two threads at once (the caller and one helper the context starts on first
// use), each taking the next record nobody has taken: where a core is free the AEAD's time on the
// critical path halves; where none is, the caller does them all and waits for nobody (docs/wire.md).
#ifndef FERRY_AEAD_H
#define FERRY_AEAD_H

#include <stddef.h>
#include <stdint.h>

/// One direction's AEAD context: a BoringSSL EVP_AEAD_CTX with the key schedule set up once, and a
/// helper thread for large frames (started on first use, stopped by `ferry_aead_free`).
typedef struct ferry_aead ferry_aead;

enum ferry_aead_suite { FERRY_AEAD_AES_256_GCM = 1, FERRY_AEAD_CHACHA20_POLY1305 = 2 };

/// A context for `suite` under the 32-byte `key`, with 16-byte tags; NULL if BoringSSL refuses it.
/// `parallel` 0: no helper thread, every record on the caller's (a benchmark's comparison).
ferry_aead *ferry_aead_new(int suite, const uint8_t *key, size_t key_length, int parallel);
/// Frees the context and stops its helper thread.
void ferry_aead_free(ferry_aead *aead);

/// Seals frame `sequence`'s body, `metadata` ‖ `payload`, as records of `record_bytes`
/// (`metadata_length` <= `record_bytes`), each authenticating `ad` (the frame header): the
/// metadata is encrypted in place; the rest of record 0 (the payload's first bytes) and its tag,
/// then every later record and its tag, are written to `out` (room for the payload plus 16 bytes
/// per record). 1 on success.
int ferry_aead_seal_frame(ferry_aead *aead, uint64_t sequence, size_t record_bytes,
                          const uint8_t *ad, size_t ad_length,
                          uint8_t *metadata, size_t metadata_length,
                          const uint8_t *payload, size_t payload_length, uint8_t *out);

/// Opens frame `sequence`'s sealed body (`records` records of `record_bytes`, each followed by its
/// tag, `sealed_length` bytes in all) into `out` (`sealed_length` - 16 x `records` bytes, not
/// overlapping `sealed`), authenticating `ad`. 1 if every record is intact.
int ferry_aead_open_frame(ferry_aead *aead, uint64_t sequence, size_t record_bytes, size_t records,
                          const uint8_t *ad, size_t ad_length,
                          const uint8_t *sealed, size_t sealed_length, uint8_t *out);

#endif
