// OpenSSL's libcrypto (Debian's libssl-dev): only its EVP AEAD interface, which seals a frame in
// place with a key schedule set up once per connection (swift-crypto's AEADs return a new buffer
// per call). <sys/select.h> first so that fd_set is defined once across every C module.
#include <sys/select.h>
#include <openssl/evp.h>
#include <openssl/err.h>
