/// The numbers of the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`): magics, flags,
/// options, option replies, info types, commands, command flags, reply types and errors.
/// Everything on the wire is big-endian.
public enum NBDProtocol {
    // Handshake.
    public static let nbdMagic: UInt64 = 0x4e42_444d_4147_4943          // "NBDMAGIC"
    public static let optionMagic: UInt64 = 0x4948_4156_454F_5054       // "IHAVEOPT"
    public static let optionReplyMagic: UInt64 = 0x3_e889_0455_65a9
    public static let oldstyleMagic: UInt64 = 0x0000_4202_8186_1253

    // Handshake flags (server) and client flags.
    public static let flagFixedNewstyle: UInt16 = 1 << 0
    public static let flagNoZeroes: UInt16 = 1 << 1
    public static let clientFixedNewstyle: UInt32 = 1 << 0
    public static let clientNoZeroes: UInt32 = 1 << 1

    // Transmission flags.
    public static let flagHasFlags: UInt16 = 1 << 0
    public static let flagReadOnly: UInt16 = 1 << 1
    public static let flagSendFlush: UInt16 = 1 << 2
    public static let flagSendFUA: UInt16 = 1 << 3
    public static let flagRotational: UInt16 = 1 << 4
    public static let flagSendTrim: UInt16 = 1 << 5
    public static let flagSendWriteZeroes: UInt16 = 1 << 6
    public static let flagSendDF: UInt16 = 1 << 7
    public static let flagCanMultiConn: UInt16 = 1 << 8
    public static let flagSendResize: UInt16 = 1 << 9
    public static let flagSendCache: UInt16 = 1 << 10
    public static let flagSendFastZero: UInt16 = 1 << 11

    // Options.
    public static let optExportName: UInt32 = 1
    public static let optAbort: UInt32 = 2
    public static let optList: UInt32 = 3
    public static let optPeekExport: UInt32 = 4
    public static let optStartTLS: UInt32 = 5
    public static let optInfo: UInt32 = 6
    public static let optGo: UInt32 = 7
    public static let optStructuredReply: UInt32 = 8
    public static let optListMetaContext: UInt32 = 9
    public static let optSetMetaContext: UInt32 = 10

    // Option reply types.
    public static let repAck: UInt32 = 1
    public static let repServer: UInt32 = 2
    public static let repInfo: UInt32 = 3
    public static let repMetaContext: UInt32 = 4
    public static let repErrUnsup: UInt32 = 1 << 31 | 1
    public static let repErrPolicy: UInt32 = 1 << 31 | 2
    public static let repErrInvalid: UInt32 = 1 << 31 | 3
    public static let repErrPlatform: UInt32 = 1 << 31 | 4
    public static let repErrTLSReqd: UInt32 = 1 << 31 | 5
    public static let repErrUnknown: UInt32 = 1 << 31 | 6
    public static let repErrShutdown: UInt32 = 1 << 31 | 7
    public static let repErrBlockSizeReqd: UInt32 = 1 << 31 | 8
    public static let repErrTooBig: UInt32 = 1 << 31 | 9

    // Info types (NBD_OPT_INFO / NBD_OPT_GO).
    public static let infoExport: UInt16 = 0
    public static let infoName: UInt16 = 1
    public static let infoDescription: UInt16 = 2
    public static let infoBlockSize: UInt16 = 3

    // Requests and replies.
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef
    public static let requestHeaderSize = 28
    public static let simpleReplySize = 16
    public static let structuredReplyHeaderSize = 20

    // Commands.
    public static let cmdRead: UInt16 = 0
    public static let cmdWrite: UInt16 = 1
    public static let cmdDisc: UInt16 = 2
    public static let cmdFlush: UInt16 = 3
    public static let cmdTrim: UInt16 = 4
    public static let cmdCache: UInt16 = 5
    public static let cmdWriteZeroes: UInt16 = 6
    public static let cmdBlockStatus: UInt16 = 7
    public static let cmdResize: UInt16 = 8

    // Command flags.
    public static let cmdFlagFUA: UInt16 = 1 << 0
    public static let cmdFlagNoHole: UInt16 = 1 << 1
    public static let cmdFlagDF: UInt16 = 1 << 2
    public static let cmdFlagReqOne: UInt16 = 1 << 3
    public static let cmdFlagFastZero: UInt16 = 1 << 4

    // Structured reply flags and types.
    public static let replyFlagDone: UInt16 = 1 << 0
    public static let replyTypeNone: UInt16 = 0
    public static let replyTypeOffsetData: UInt16 = 1
    public static let replyTypeOffsetHole: UInt16 = 2
    public static let replyTypeBlockStatus: UInt16 = 5
    public static let replyTypeError: UInt16 = 1 << 15 | 1
    public static let replyTypeErrorOffset: UInt16 = 1 << 15 | 2

    // base:allocation status flags.
    public static let stateHole: UInt32 = 1 << 0
    public static let stateZero: UInt32 = 1 << 1

    /// The one metadata context this server offers, and its id.
    public static let baseAllocation = "base:allocation"
    public static let baseAllocationID: UInt32 = 1

    /// Strings (export names, queries) longer than this are refused (proto.md: "MUST be no longer than 4096 bytes").
    public static let maxString = 4096
}

/// The error values a reply carries (proto.md "Error values"); not the host's errno numbers.
public enum NBDErrorCode: UInt32, Sendable {
    case ok = 0
    case eperm = 1
    case eio = 5
    case enomem = 12
    case einval = 22
    case enospc = 28
    case eoverflow = 75
    case enotsup = 95
    case eshutdown = 108

    /// Maps a host errno (from a failed I/O) to the NBD error a client understands.
    public init(hostErrno: Int32) {
        switch hostErrno {
        case 1, 13, 30: self = .eperm          // EPERM, EACCES, EROFS
        case 12: self = .enomem
        case 22: self = .einval
        case 28, 27, 122: self = .enospc       // ENOSPC, EFBIG, EDQUOT
        case 75: self = .eoverflow
        case 95: self = .enotsup               // EOPNOTSUPP
        case 108: self = .eshutdown
        default: self = .eio
        }
    }
}
