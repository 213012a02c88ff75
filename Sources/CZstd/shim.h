// zstd: compression of page and block batches on slow links (MigrationEngine/Link/PayloadCompression.swift).
#include <sys/select.h>
#include <zstd.h>
