// Frame sealing with BoringSSL's EVP_AEAD, as vendored by swift-crypto (its CCryptoBoringSSL
// target, linked into every agent through the Crypto product). swift-crypto's Swift API allocates
// the ciphertext on every call; the link seals a frame's payload straight into the sender's reused
// buffer and opens frames in place, so it calls the same library's C API here. BoringSSL picks its
// fastest AES-GCM at run time: VAES + VPCLMULQDQ on AVX2 where the CPU has them (about 1.8x
// OpenSSL 3.0's AES-NI code on this machine's AMD EPYC, ferry-bench seal).
#ifndef FERRY_AEAD_H
#define FERRY_AEAD_H

#include <stddef.h>
#include <stdint.h>

/// One direction's AEAD context (a BoringSSL EVP_AEAD_CTX with the key schedule set up once).
typedef struct ferry_aead ferry_aead;

enum ferry_aead_suite { FERRY_AEAD_AES_256_GCM = 1, FERRY_AEAD_CHACHA20_POLY1305 = 2 };

/// A context for `suite` under the 32-byte `key`, with 16-byte tags; NULL if BoringSSL refuses it.
ferry_aead *ferry_aead_new(int suite, const uint8_t *key, size_t key_length);
void ferry_aead_free(ferry_aead *aead);

/// Seals `metadata` (encrypted in place) followed by `payload` (encrypted into `payload_out`),
/// authenticating `ad`; the 16-byte tag is written right after the payload's ciphertext
/// (`payload_out + payload_length`). 1 on success.
int ferry_aead_seal(const ferry_aead *aead, const uint8_t nonce[12], const uint8_t *ad, size_t ad_length,
                    uint8_t *metadata, size_t metadata_length,
                    const uint8_t *payload, size_t payload_length, uint8_t *payload_out);

/// Opens `body` in place against the 16-byte `tag`, authenticating `ad`. 1 if the frame is intact.
int ferry_aead_open(const ferry_aead *aead, const uint8_t nonce[12], const uint8_t *ad, size_t ad_length,
                    uint8_t *body, size_t body_length, const uint8_t *tag);

#endif
