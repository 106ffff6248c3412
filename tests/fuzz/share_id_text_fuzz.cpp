// libFuzzer target: the text forms of share ids and keys (include/steward/share_id.hpp).
//
// The input is read four ways: as a share id text, as a key in hex, as a key in decimal, and as
// a socket address to build an id from. Invariants, beyond "does not crash":
// - parse() either fails with malformed_message (the throwing overload throws the same code) and
//   returns an empty id, or returns an id whose address is absolute, 1..107 bytes, NUL-free;
//   then parse(format(id)) == id, format(parse(format(id))) == format(id), the formatted text has
//   only the documented characters, and its key part equals the input's up to letter case;
// - for every valid address, parse(format(make(address, key))) == that id (the header's promise);
//   invalid addresses are refused with the documented error;
// - keys: from_hex/to_hex and from_decimal/to_decimal are inverse on what they accept, and
//   to_cpython/from_cpython round-trips an id.

#include "fuzz_support.hpp"

#include <steward/error.hpp>
#include <steward/share_id.hpp>

#include <algorithm>
#include <cctype>
#include <string>
#include <string_view>

namespace {

using steward::share_id;
using steward::share_key;

constexpr std::string_view prefix = "steward1:";

bool literal(unsigned char c) {
    return std::isalnum(c) ||
           std::string_view("/._-~+,=:").find(static_cast<char>(c)) != std::string_view::npos;
}

bool is_upper_hex(char c) {
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F');
}

std::string lower(std::string_view s) {
    std::string out(s);
    for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return out;
}

void check_formatted(const std::string& text) {
    FUZZ_CHECK(text.starts_with(prefix));
    FUZZ_CHECK(text.size() >= prefix.size() + 34 && text[prefix.size() + 32] == '@');
    for (std::size_t i = 0; i < 32; ++i) {
        const char c = text[prefix.size() + i];
        FUZZ_CHECK((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
    }
    const std::string_view address = std::string_view(text).substr(prefix.size() + 33);
    for (std::size_t i = 0; i < address.size(); ++i) {
        const auto c = static_cast<unsigned char>(address[i]);
        if (c == '%') {
            FUZZ_CHECK(i + 2 < address.size() && is_upper_hex(address[i + 1]) &&
                       is_upper_hex(address[i + 2]));
            // Only bytes that cannot stay literal are escaped.
            const int value = std::stoi(std::string(address.substr(i + 1, 2)), nullptr, 16);
            FUZZ_CHECK(!literal(static_cast<unsigned char>(value)));
            i += 2;
        } else {
            FUZZ_CHECK(literal(c));
        }
    }
}

void check_id(const share_id& id) {
    FUZZ_CHECK(!id.empty());
    const std::string& address = id.address();
    FUZZ_CHECK(address.size() >= 1 && address.size() <= 107 && address.front() == '/');
    FUZZ_CHECK(address.find('\0') == std::string::npos);

    const std::string text = id.format();
    check_formatted(text);
    std::error_code ec;
    const share_id again = share_id::parse(text, ec);
    FUZZ_CHECK(!ec && again == id);
    FUZZ_CHECK(again.format() == text);

    const steward::cpython_ident ident = id.to_cpython();
    FUZZ_CHECK(ident.address == address);
    const share_id from_python = share_id::from_cpython(ident, ec);
    FUZZ_CHECK(!ec && from_python == id);
}

void check_parse(std::string_view input) {
    std::error_code ec;
    const share_id id = share_id::parse(input, ec);
    bool threw = false;
    try {
        const share_id thrown = share_id::parse(input);
        FUZZ_CHECK(thrown == id);
    } catch (const std::system_error& e) {
        threw = true;
        FUZZ_CHECK(e.code() == ec);
    }
    FUZZ_CHECK(threw == static_cast<bool>(ec));
    if (ec) {
        FUZZ_CHECK(ec == steward::errc::malformed_message);
        FUZZ_CHECK(id.empty());
        return;
    }
    FUZZ_CHECK(input.starts_with(prefix));
    FUZZ_CHECK(lower(input.substr(prefix.size(), 32)) == id.key().to_hex());
    check_id(id);
}

void check_address(std::string_view input, share_key key) {
    std::error_code ec;
    const share_id id = share_id::make(std::string(input), key, ec);
    const bool valid = !input.empty() && input.size() <= 107 && input.front() == '/' &&
                       input.find('\0') == std::string_view::npos;
    if (!valid) {
        FUZZ_CHECK(ec && id.empty());
        FUZZ_CHECK(ec == (input.size() > 107 ? std::make_error_code(std::errc::filename_too_long)
                                             : std::make_error_code(std::errc::invalid_argument)));
        return;
    }
    FUZZ_CHECK(!ec && id.address() == input && id.key() == key);
    check_id(id);
}

void check_keys(std::string_view input) {
    std::error_code ec;
    const share_key hex = share_key::from_hex(input, ec);
    if (!ec) {
        FUZZ_CHECK(input.size() == 32 && hex.to_hex() == lower(input));
        FUZZ_CHECK(share_key::from_decimal(hex.to_decimal()) == hex);
    } else {
        FUZZ_CHECK(ec == steward::errc::malformed_message && hex == share_key{});
    }
    const share_key dec = share_key::from_decimal(input, ec);
    if (!ec) {
        std::string_view digits = input;
        while (digits.size() > 1 && digits.front() == '0') digits.remove_prefix(1);
        FUZZ_CHECK(dec.to_decimal() == digits);
        FUZZ_CHECK(share_key::from_hex(dec.to_hex()) == dec);
    } else {
        FUZZ_CHECK(ec == steward::errc::malformed_message && dec == share_key{});
    }
}

}  // namespace

// The entry point libFuzzer calls, by that name.
// NOLINTNEXTLINE(readability-identifier-naming)
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    check_parse(input);
    check_keys(input);
    // Keys at the edges and one taken from the input, so both halves vary.
    share_key key{};
    for (std::size_t i = 0; i < size && i < 16; ++i) {
        std::uint64_t& half = i < 8 ? key.high : key.low;
        half = half << 8 | data[i];
    }
    check_address(input, key);
    check_address(input, share_key{~std::uint64_t{0}, ~std::uint64_t{0}});
    // An id whose address is the input after the text prefix, so printable paths are common.
    if (input.starts_with(prefix)) check_address(input.substr(prefix.size()), key);
    return 0;
}
