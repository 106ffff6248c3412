#include <steward/share_id.hpp>

#include <steward/error.hpp>

#include "sharer/random.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <new>

namespace steward {
namespace {

__extension__ using u128 = unsigned __int128;

constexpr std::string_view text_prefix = "steward1:";
constexpr std::size_t max_address = 107;  // sun_path[108] minus the terminating NUL
constexpr char hex_digits[] = "0123456789abcdef";
constexpr char upper_hex_digits[] = "0123456789ABCDEF";

int hex_value(char c) noexcept {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

u128 to_u128(share_key k) noexcept {
    return (static_cast<u128>(k.high) << 64) | k.low;
}
share_key from_u128(u128 v) noexcept {
    return {static_cast<std::uint64_t>(v >> 64), static_cast<std::uint64_t>(v)};
}

// Bytes that stay literal in the text form: nothing a shell, a URL-ish reader or a
// whitespace-splitting reader treats specially, and never '%' or '@'.
bool literal_byte(unsigned char c) noexcept {
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) return true;
    return std::strchr("/._-~+,=:", c) != nullptr && c != '\0';
}

std::error_code check_address(std::string_view address) noexcept {
    if (address.size() > max_address) return std::make_error_code(std::errc::filename_too_long);
    if (address.empty() || address.front() != '/' || address.find('\0') != std::string_view::npos)
        return std::make_error_code(std::errc::invalid_argument);
    return {};
}

// The one parser behind both parse() overloads; @p why names the defect for the throwing one.
share_id parse_text(std::string_view text, std::error_code& ec, const char** why) {
    auto fail = [&](const char* reason) {
        ec = errc::malformed_message;
        if (why) *why = reason;
        return share_id{};
    };
    ec.clear();
    if (text.substr(0, text_prefix.size()) != text_prefix)
        return fail("share id: expected the prefix 'steward1:'");
    text.remove_prefix(text_prefix.size());
    if (text.size() < 33 || text[32] != '@')
        return fail("share id: expected 32 hex digits of key followed by '@'");
    std::error_code key_ec;
    const share_key key = share_key::from_hex(text.substr(0, 32), key_ec);
    if (key_ec) return fail("share id: the key must be 32 hex digits");
    text.remove_prefix(33);
    std::string address;
    for (std::size_t i = 0; i < text.size(); ++i) {
        const auto c = static_cast<unsigned char>(text[i]);
        if (c == '%') {
            if (i + 2 >= text.size()) return fail("share id: '%' must be followed by two hex digits");
            const int hi = hex_value(text[i + 1]);
            const int lo = hex_value(text[i + 2]);
            if (hi < 0 || lo < 0) return fail("share id: '%' must be followed by two hex digits");
            address.push_back(static_cast<char>(hi * 16 + lo));
            i += 2;
        } else if (literal_byte(c)) {
            address.push_back(static_cast<char>(c));
        } else {
            return fail("share id: the address holds a character that must be percent-encoded");
        }
        if (address.size() > max_address) return fail("share id: the address is longer than 107 bytes");
    }
    if (address.empty()) return fail("share id: the address is empty");
    if (address.front() != '/') return fail("share id: the address must be an absolute path");
    if (address.find('\0') != std::string::npos) return fail("share id: the address holds a NUL byte");
    return share_id::make(std::move(address), key, ec);
}

}  // namespace

// ---- share_key -------------------------------------------------------------------------------

share_key share_key::generate() {
    std::array<std::byte, 16> bytes;
    detail::fill_random_buffered(bytes);
    share_key k;
    std::memcpy(&k.high, bytes.data(), 8);
    std::memcpy(&k.low, bytes.data() + 8, 8);
    return k;
}

std::string share_key::to_hex() const {
    std::string out(32, '0');
    u128 v = to_u128(*this);
    for (std::size_t i = 32; i-- > 0;) {
        out[i] = hex_digits[static_cast<unsigned>(v & 15)];
        v >>= 4;
    }
    return out;
}

share_key share_key::from_hex(std::string_view hex, std::error_code& ec) noexcept {
    ec.clear();
    if (hex.size() != 32) {
        ec = errc::malformed_message;
        return {};
    }
    u128 v = 0;
    for (char c : hex) {
        const int d = hex_value(c);
        if (d < 0) {
            ec = errc::malformed_message;
            return {};
        }
        v = (v << 4) | static_cast<unsigned>(d);
    }
    return from_u128(v);
}

share_key share_key::from_hex(std::string_view hex) {
    std::error_code ec;
    const share_key k = from_hex(hex, ec);
    throw_if(ec, "share key: expected 32 hex digits");
    return k;
}

std::string share_key::to_decimal() const {
    u128 v = to_u128(*this);
    std::string out;
    do {
        out.push_back(static_cast<char>('0' + static_cast<unsigned>(v % 10)));
        v /= 10;
    } while (v != 0);
    std::reverse(out.begin(), out.end());
    return out;
}

share_key share_key::from_decimal(std::string_view digits, std::error_code& ec) noexcept {
    ec.clear();
    if (digits.empty()) {
        ec = errc::malformed_message;
        return {};
    }
    const u128 max = ~static_cast<u128>(0);
    u128 v = 0;
    for (char c : digits) {
        if (c < '0' || c > '9') {
            ec = errc::malformed_message;
            return {};
        }
        const auto d = static_cast<unsigned>(c - '0');
        if (v > (max - d) / 10) {
            ec = errc::malformed_message;
            return {};
        }
        v = v * 10 + d;
    }
    return from_u128(v);
}

share_key share_key::from_decimal(std::string_view digits) {
    std::error_code ec;
    const share_key k = from_decimal(digits, ec);
    throw_if(ec, "share key: expected a decimal number below 2^128");
    return k;
}

// ---- share_id --------------------------------------------------------------------------------

share_id::share_id(std::string address, share_key key) {
    if (const std::error_code ec = check_address(address))
        throw std::system_error(ec,
                                "share id: the address must be an absolute path of 1..107 bytes "
                                "without NUL");
    address_ = std::move(address);
    key_ = key;
}

share_id share_id::make(std::string address, share_key key, std::error_code& ec) noexcept {
    ec = check_address(address);
    share_id id;
    if (ec) return id;
    id.address_ = std::move(address);
    id.key_ = key;
    return id;
}

std::string share_id::format() const {
    std::string out(text_prefix);
    out += key_.to_hex();
    out.push_back('@');
    for (char ch : address_) {
        const auto c = static_cast<unsigned char>(ch);
        if (literal_byte(c)) {
            out.push_back(ch);
        } else {
            out.push_back('%');
            out.push_back(upper_hex_digits[c >> 4]);
            out.push_back(upper_hex_digits[c & 15]);
        }
    }
    return out;
}

share_id share_id::parse(std::string_view text, std::error_code& ec) noexcept {
    try {
        return parse_text(text, ec, nullptr);
    } catch (const std::bad_alloc&) {
        ec = std::make_error_code(std::errc::not_enough_memory);
        return {};
    }
}

share_id share_id::parse(std::string_view text) {
    std::error_code ec;
    const char* why = "share id: malformed";
    share_id id = parse_text(text, ec, &why);
    throw_if(ec, why);
    return id;
}

cpython_ident share_id::to_cpython() const {
    return {address_, key_.to_decimal()};
}

share_id share_id::from_cpython(const cpython_ident& ident, std::error_code& ec) noexcept {
    const share_key key = share_key::from_decimal(ident.key, ec);
    if (ec) return {};
    try {
        return make(ident.address, key, ec);
    } catch (const std::bad_alloc&) {
        ec = std::make_error_code(std::errc::not_enough_memory);
        return {};
    }
}

share_id share_id::from_cpython(const cpython_ident& ident) {
    const share_key key = share_key::from_decimal(ident.key);
    return share_id(ident.address, key);
}

}  // namespace steward
