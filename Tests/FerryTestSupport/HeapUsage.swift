import CFerryTestShims

/// Bytes the C allocator has handed out and not had back in the calling thread's arena (the main
/// arena on the main thread, where XCTest runs its tests), from `mallinfo2`.
public func heapBytesInUse() -> UInt64 { ferry_test_heap_in_use() }
