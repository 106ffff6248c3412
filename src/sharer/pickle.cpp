#include "sharer/pickle.hpp"

#include <steward/error.hpp>

#include <array>
#include <stdexcept>

namespace steward::detail::pickle {
namespace {

__extension__ using u128 = unsigned __int128;

enum opcode : unsigned char {
    PROTO = 0x80,
    FRAME = 0x95,
    BININT1 = 'K',
    BININT2 = 'M',
    BININT = 'J',
    LONG1 = 0x8a,
    TUPLE2 = 0x86,
    MEMOIZE = 0x94,
    BINPUT = 'q',
    NONE = 'N',
    STOP = '.',
};

// A pickled int reduced to what this subset needs: sign and magnitude up to 128 bits.
struct integer {
    bool negative = false;
    u128 magnitude = 0;
};

struct value {
    enum class kind { none, integer, pair } k = kind::none;
    integer first;   // the int, or the pair's first element
    integer second;  // the pair's second element
};

// LONG1 payload: little-endian two's complement of n bytes. Refuses magnitudes above 128 bits.
bool decode_long(const unsigned char* p, std::size_t n, integer& out) noexcept {
    out = {};
    if (n == 0) return true;
    const bool negative = (p[n - 1] & 0x80) != 0;
    // Bytes beyond the 16th may only be sign extension, except that -2^128 needs a 17th byte.
    if (n > 17) return false;
    if (n == 17 && p[16] != (negative ? 0xff : 0x00)) return false;
    u128 v = 0;
    const std::size_t low = n < 16 ? n : 16;
    for (std::size_t i = low; i-- > 0;) v = (v << 8) | p[i];
    if (!negative) {
        out.magnitude = v;
        return true;
    }
    // Sign-extend to 128 bits, then negate. A 17-byte value whose low 16 bytes are all zero is
    // -2^128, whose magnitude does not fit in 128 bits.
    if (n < 16) v |= ~static_cast<u128>(0) << (8 * n);
    if (n == 17 && v == 0) return false;
    out.negative = true;
    out.magnitude = ~v + 1;
    return true;
}

void append_byte(std::vector<std::byte>& out, unsigned v) {
    out.push_back(static_cast<std::byte>(v));
}

// CPython's save_long for protocol >= 2: BININT1 / BININT2 / BININT for values that fit a signed
// 32-bit int, else LONG1 with the minimal two's-complement little-endian bytes.
void append_int(std::vector<std::byte>& out, bool negative, u128 magnitude) {
    if (!negative && magnitude <= 0xff) {
        append_byte(out, BININT1);
        append_byte(out, static_cast<unsigned>(magnitude));
        return;
    }
    if (!negative && magnitude <= 0xffff) {
        append_byte(out, BININT2);
        append_byte(out, static_cast<unsigned>(magnitude & 0xff));
        append_byte(out, static_cast<unsigned>(magnitude >> 8));
        return;
    }
    if ((!negative && magnitude <= 0x7fffffff) || (negative && magnitude <= 0x80000000U)) {
        const auto v = static_cast<std::uint32_t>(negative ? 0 - static_cast<std::uint32_t>(magnitude)
                                                           : static_cast<std::uint32_t>(magnitude));
        append_byte(out, BININT);
        for (int i = 0; i < 4; ++i) append_byte(out, (v >> (8 * i)) & 0xff);
        return;
    }
    // Two's complement over 17 bytes (enough for any 128-bit magnitude plus a sign bit), then
    // drop the redundant sign-extension bytes as encode_long does.
    std::array<unsigned char, 17> bytes{};
    u128 v = negative ? ~magnitude + 1 : magnitude;
    for (std::size_t i = 0; i < 16; ++i) {
        bytes[i] = static_cast<unsigned char>(v & 0xff);
        v >>= 8;
    }
    bytes[16] = negative ? 0xff : 0x00;
    std::size_t n = 17;
    while (n > 1) {
        const unsigned char top = bytes[n - 1];
        const bool next_negative = (bytes[n - 2] & 0x80) != 0;
        if ((top == 0x00 && !next_negative) || (top == 0xff && next_negative))
            --n;
        else
            break;
    }
    append_byte(out, LONG1);
    append_byte(out, static_cast<unsigned>(n));
    for (std::size_t i = 0; i < n; ++i) append_byte(out, bytes[i]);
}

std::vector<std::byte> finish(int protocol, const std::vector<std::byte>& body) {
    if (protocol < 2 || protocol > 5) throw std::invalid_argument("pickle protocol must be 2..5");
    std::vector<std::byte> out;
    out.reserve(body.size() + 11);
    append_byte(out, PROTO);
    append_byte(out, static_cast<unsigned>(protocol));
    // The C pickler frames (protocol >= 4) any frame of at least 4 bytes.
    if (protocol >= 4 && body.size() >= 4) {
        append_byte(out, FRAME);
        for (int i = 0; i < 8; ++i) append_byte(out, static_cast<unsigned>((body.size() >> (8 * i)) & 0xff));
    }
    out.insert(out.end(), body.begin(), body.end());
    return out;
}

}  // namespace

decoded decode(std::span<const std::byte> pickle, std::error_code& ec, const char** why) noexcept {
    auto fail = [&](const char* reason) {
        ec = errc::malformed_message;
        if (why) *why = reason;
        return decoded{};
    };
    ec.clear();
    const auto* p = reinterpret_cast<const unsigned char*>(pickle.data());
    const std::size_t size = pickle.size();
    if (size < 2 || p[0] != PROTO) return fail("pickle: does not start with PROTO");
    const unsigned protocol = p[1];
    if (protocol < 2 || protocol > 5) return fail("pickle: protocol outside 2..5");

    std::array<value, 2> stack{};
    std::size_t depth = 0;
    std::size_t pos = 2;
    std::size_t frame_end = 0;  // 0: not inside a frame
    // Every opcode with its argument must lie inside the current frame (as the unpickler demands).
    std::size_t limit = size;  // end of the frame the current opcode started in, or of the data
    auto take = [&](std::size_t n) -> const unsigned char* {
        if (n > limit - pos) return nullptr;
        const unsigned char* at = p + pos;
        pos += n;
        return at;
    };
    auto push_int = [&](integer v) {
        if (depth == stack.size()) return false;
        stack[depth++] = {value::kind::integer, v, {}};
        return true;
    };

    while (true) {
        limit = (frame_end > pos) ? frame_end : size;
        const unsigned char* op = take(1);
        if (!op) return fail("pickle: truncated (no STOP)");
        switch (*op) {
            case FRAME: {
                if (protocol < 4) return fail("pickle: FRAME below protocol 4");
                if (frame_end > pos - 1) return fail("pickle: FRAME inside a frame");
                const unsigned char* a = take(8);
                if (!a) return fail("pickle: truncated FRAME");
                std::uint64_t n = 0;
                for (int i = 7; i >= 0; --i) n = (n << 8) | a[i];
                if (n > size - pos) return fail("pickle: FRAME longer than the data");
                frame_end = pos + static_cast<std::size_t>(n);
                break;
            }
            case BININT1: {
                const unsigned char* a = take(1);
                if (!a) return fail("pickle: truncated BININT1");
                if (!push_int({false, a[0]})) return fail("pickle: too many values");
                break;
            }
            case BININT2: {
                const unsigned char* a = take(2);
                if (!a) return fail("pickle: truncated BININT2");
                if (!push_int({false, static_cast<u128>(a[0] | (a[1] << 8))}))
                    return fail("pickle: too many values");
                break;
            }
            case BININT: {
                const unsigned char* a = take(4);
                if (!a) return fail("pickle: truncated BININT");
                const std::uint32_t raw =
                    a[0] | (a[1] << 8) | (a[2] << 16) | (static_cast<std::uint32_t>(a[3]) << 24);
                const bool negative = (raw & 0x80000000U) != 0;
                const integer v{negative, negative ? static_cast<u128>(0 - raw) : static_cast<u128>(raw)};
                if (!push_int(v)) return fail("pickle: too many values");
                break;
            }
            case LONG1: {
                const unsigned char* n = take(1);
                if (!n) return fail("pickle: truncated LONG1");
                const unsigned char* a = take(*n);
                if (!a) return fail("pickle: truncated LONG1");
                integer v;
                if (!decode_long(a, *n, v)) return fail("pickle: integer wider than 128 bits");
                if (!push_int(v)) return fail("pickle: too many values");
                break;
            }
            case NONE:
                if (depth == stack.size()) return fail("pickle: too many values");
                stack[depth++] = {};
                break;
            case TUPLE2:
                if (depth != 2 || stack[0].k != value::kind::integer || stack[1].k != value::kind::integer)
                    return fail("pickle: TUPLE2 needs two ints");
                stack[0] = {value::kind::pair, stack[0].first, stack[1].first};
                depth = 1;
                break;
            case MEMOIZE:
                if (protocol < 4) return fail("pickle: MEMOIZE below protocol 4");
                if (depth == 0) return fail("pickle: MEMOIZE on an empty stack");
                break;  // the memo is never read back by this subset (no GET opcodes are accepted)
            case BINPUT:
                if (!take(1)) return fail("pickle: truncated BINPUT");
                if (depth == 0) return fail("pickle: BINPUT on an empty stack");
                break;
            case STOP: {
                if (pos != size) return fail("pickle: bytes after STOP");
                if (frame_end > pos) return fail("pickle: STOP before the end of its frame");
                if (depth != 1) return fail("pickle: STOP needs exactly one value");
                const value& v = stack[0];
                if (v.k == value::kind::none) return decoded{};
                if (v.k != value::kind::pair) return fail("pickle: expected (key, pid) or None");
                if (v.first.negative) return fail("pickle: negative key");
                const u128 pid_limit =
                    v.second.negative ? (static_cast<u128>(1) << 63) : (static_cast<u128>(1) << 63) - 1;
                if (v.second.magnitude > pid_limit) return fail("pickle: pid does not fit in 64 bits");
                decoded d;
                d.kind = value_kind::request;
                d.request.key = {static_cast<std::uint64_t>(v.first.magnitude >> 64),
                                 static_cast<std::uint64_t>(v.first.magnitude)};
                const auto pid_bits = static_cast<std::uint64_t>(v.second.magnitude);
                d.request.pid = v.second.negative ? static_cast<std::int64_t>(0 - pid_bits)
                                                  : static_cast<std::int64_t>(pid_bits);
                return d;
            }
            default:
                return fail("pickle: opcode outside the accepted subset");
        }
    }
}

std::vector<std::byte> encode_request(share_key key, std::int64_t pid, int protocol) {
    std::vector<std::byte> body;
    body.reserve(32);
    append_int(body, false, (static_cast<u128>(key.high) << 64) | key.low);
    const bool negative = pid < 0;
    const auto pid_bits = static_cast<std::uint64_t>(pid);
    append_int(body, negative, negative ? static_cast<u128>(0 - pid_bits) : static_cast<u128>(pid_bits));
    append_byte(body, TUPLE2);
    if (protocol >= 4) {
        append_byte(body, MEMOIZE);
    } else {
        append_byte(body, BINPUT);
        append_byte(body, 0);
    }
    append_byte(body, STOP);
    return finish(protocol, body);
}

std::vector<std::byte> encode_none(int protocol) {
    std::vector<std::byte> body;
    append_byte(body, NONE);
    append_byte(body, STOP);
    return finish(protocol, body);
}

}  // namespace steward::detail::pickle
