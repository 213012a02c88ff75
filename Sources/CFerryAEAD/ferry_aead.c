#include "ferry_aead.h"

#include <CCryptoBoringSSL_aead.h>

struct ferry_aead;   // never defined: a ferry_aead * is an EVP_AEAD_CTX *

ferry_aead *ferry_aead_new(int suite, const uint8_t *key, size_t key_length) {
    const EVP_AEAD *aead = suite == FERRY_AEAD_AES_256_GCM ? EVP_aead_aes_256_gcm()
                         : suite == FERRY_AEAD_CHACHA20_POLY1305 ? EVP_aead_chacha20_poly1305() : NULL;
    if (aead == NULL || key_length != EVP_AEAD_key_length(aead)) return NULL;
    return (ferry_aead *)EVP_AEAD_CTX_new(aead, key, key_length, 16);
}

void ferry_aead_free(ferry_aead *aead) { EVP_AEAD_CTX_free((EVP_AEAD_CTX *)aead); }

int ferry_aead_seal(const ferry_aead *aead, const uint8_t nonce[12], const uint8_t *ad, size_t ad_length,
                    uint8_t *metadata, size_t metadata_length,
                    const uint8_t *payload, size_t payload_length, uint8_t *payload_out) {
    // seal_scatter: `in` (the metadata) is encrypted to `out`, then `extra_in` (the payload) to
    // `out_tag`, followed by the tag: one keystream and one tag over metadata ‖ payload.
    size_t written = 0;
    if (!EVP_AEAD_CTX_seal_scatter((const EVP_AEAD_CTX *)aead, metadata, payload_out, &written, payload_length + 16,
                                   nonce, 12, metadata, metadata_length, payload, payload_length, ad, ad_length)) {
        return 0;
    }
    return written == payload_length + 16;
}

int ferry_aead_open(const ferry_aead *aead, const uint8_t nonce[12], const uint8_t *ad, size_t ad_length,
                    uint8_t *body, size_t body_length, const uint8_t *tag) {
    return EVP_AEAD_CTX_open_gather((const EVP_AEAD_CTX *)aead, body, nonce, 12, body, body_length, tag, 16,
                                    ad, ad_length);
}
