// libFuzzer target: the tracker's wire codec (src/tracker/codec.hpp).
//
// The input is what a hostile or broken process of the family writes into the tracker pipe.
// Invariants checked, beyond "does not crash":
// - decode_line: a line over 512 bytes is too_long; a decoded REGISTER/UNREGISTER has a
//   non-empty, NUL-free canonical name that canonical_name() leaves unchanged (idempotent), and
//   file/directory names are absolute without "//", a trailing '/', "." or "..";
// - re-encoding: encode_message(decoded) either fails with message_too_long only, or yields one
//   newline-terminated line of at most 512 bytes that decodes to the same command, type and name
//   (colon format exactly when needs_json() is false); append_message() writes the same bytes;
// - line_splitter: cutting the stream into arbitrary reads yields exactly the lines and errors of
//   a straightforward reference split, and never holds back more than 512 bytes;
// - base64: decode(encode(x)) == x, and decode is stable under one re-encoding;
// - the client's codec (codec.hpp) refuses a name exactly when the daemon would,
//   and what it accepts reaches the daemon as exactly its canonical name;
// - the client's inline encoder (plain_message_size/write_plain_message) takes a name only when
//   the general path would write a colon line, and then writes the same bytes and canonical name.

#include "fuzz_support.hpp"

#include "tracker/codec.hpp"

#include <steward/error.hpp>

#include <array>
#include <string>
#include <vector>

namespace {

using namespace steward::detail::tracking;
using steward::fuzz::as_bytes;

bool within(std::string_view inner, const char* begin, std::size_t size) {
    return inner.data() >= begin && inner.data() + inner.size() <= begin + size;
}

void check_canonical(steward::resource_type type, std::string_view name) {
    FUZZ_CHECK(!name.empty());
    FUZZ_CHECK(name.find('\0') == std::string_view::npos);
    FUZZ_CHECK(name.front() == '/');
    if (type == steward::resource_type::file || type == steward::resource_type::directory) {
        FUZZ_CHECK(name.size() > 1 && name.back() != '/');
        FUZZ_CHECK(name.find("//") == std::string_view::npos);
        FUZZ_CHECK(name.find("/./") == std::string_view::npos && name.find("/../") == std::string_view::npos);
        FUZZ_CHECK(!name.ends_with("/.") && !name.ends_with("/.."));
    }
    std::string copy(name);
    std::vector<char> out(copy.size() + 1);
    std::string_view again;
    FUZZ_CHECK(canonical_name(type, copy, out.data(), again) == decode_error::none);
    FUZZ_CHECK(again == name);
}

struct message_copy {
    command cmd;
    steward::resource_type type;
    std::string name;
};

// Decodes one line and checks everything that must hold of the result.
void check_line(std::string_view line) {
    decoded_message m;
    decode_scratch scratch;
    const decode_error err = decode_line(line, m, scratch);
    FUZZ_CHECK(!describe(err).empty());
    if (line.size() > max_message_size) FUZZ_CHECK(err == decode_error::too_long);
    if (err != decode_error::none) return;

    // The name lives in the line or in the scratch area, nowhere else.
    FUZZ_CHECK(within(m.name, line.data(), line.size()) ||
               within(m.name, scratch.strings.data(), scratch.strings.size()) ||
               within(m.name, scratch.name.data(), scratch.name.size()) || m.name.empty());
    const message_copy first{m.cmd, m.type, std::string(m.name)};

    encoded_message encoded;
    const std::error_code ec = encode_message(first.cmd, first.type, first.name, encoded);
    if (first.cmd == command::probe) {
        FUZZ_CHECK(!ec && encoded.view() == "PROBE:0:noop\n");
        return;
    }
    FUZZ_CHECK(first.type != steward::resource_type::noop);
    check_canonical(first.type, first.name);
    if (ec) {
        FUZZ_CHECK(ec == steward::errc::message_too_long);
        FUZZ_CHECK(encoded.size == 0);
        return;
    }
    const std::string_view wire = encoded.view();
    FUZZ_CHECK(wire.size() <= max_message_size && !wire.empty());
    FUZZ_CHECK(wire.find('\n') == wire.size() - 1);
    FUZZ_CHECK((wire.front() == '{') == needs_json(first.name));

    std::string appended = "x";
    FUZZ_CHECK(!append_message(first.cmd, first.type, first.name, appended));
    FUZZ_CHECK(appended.substr(1) == wire);

    decoded_message again;
    decode_scratch scratch2;
    FUZZ_CHECK(decode_line(wire, again, scratch2) == decode_error::none);
    FUZZ_CHECK(again.cmd == first.cmd);
    FUZZ_CHECK(again.type == first.type);
    FUZZ_CHECK(again.name == first.name);
}

// The reference splitter: every '\n' ends a line; a line (newline included) over 512 bytes is
// one too_long; unterminated bytes at the end are partial_line, or too_long if over 512.
struct split_event {
    bool is_error;
    decode_error error;
    std::string line;
    friend bool operator==(const split_event&, const split_event&) = default;
};

std::vector<split_event> reference_split(std::string_view input) {
    std::vector<split_event> out;
    std::size_t pos = 0;
    while (pos < input.size()) {
        const std::size_t nl = input.find('\n', pos);
        if (nl == std::string_view::npos) {
            const std::size_t rest = input.size() - pos;
            out.push_back(
                {true, rest > max_message_size ? decode_error::too_long : decode_error::partial_line, {}});
            break;
        }
        const std::size_t len = nl - pos + 1;
        if (len > max_message_size)
            out.push_back({true, decode_error::too_long, {}});
        else
            out.push_back({false, decode_error::none, std::string(input.substr(pos, len))});
        pos = nl + 1;
    }
    return out;
}

void check_splitter(std::string_view input) {
    std::vector<split_event> got;
    line_splitter splitter;
    steward::fuzz::chunker cuts(steward::fuzz::seed_of(as_bytes(input)));
    auto on_line = [&](std::string_view line) {
        FUZZ_CHECK(!line.empty() && line.size() <= max_message_size && line.back() == '\n');
        got.push_back({false, decode_error::none, std::string(line)});
    };
    auto on_error = [&](decode_error e) { got.push_back({true, e, {}}); };
    for (std::size_t pos = 0; pos < input.size();) {
        // Mostly small reads (where lines span chunks), sometimes whole pipe-buffer reads.
        const std::size_t max = cuts.next(8) == 1 ? 4096 : 40;
        const std::size_t n = std::min(cuts.next(max), input.size() - pos);
        splitter.feed(input.substr(pos, n), on_line, on_error);
        FUZZ_CHECK(splitter.pending() <= max_message_size);
        pos += n;
    }
    splitter.finish(on_error);
    FUZZ_CHECK(splitter.pending() == 0);
    FUZZ_CHECK(got == reference_split(input));
    for (const auto& e : got)
        if (!e.is_error) check_line(e.line);
}

void check_base64(std::string_view input) {
    const std::string_view raw = input.substr(0, 384);
    std::string encoded((raw.size() + 2) / 3 * 4, '\0');
    FUZZ_CHECK(base64url_encode(raw, encoded.data()) == encoded.size());
    std::string decoded(encoded.size() * 3 / 4 + 1, '\0');
    std::size_t n = 0;
    FUZZ_CHECK(base64_decode(encoded, decoded.data(), n));
    FUZZ_CHECK(std::string_view(decoded.data(), n) == raw);

    // Arbitrary text: if it decodes, the bytes survive one more encode/decode.
    std::string out(input.size() * 3 / 4 + 1, '\0');
    std::size_t out_size = 0;
    if (!base64_decode(input, out.data(), out_size)) return;
    FUZZ_CHECK(out_size <= input.size() * 3 / 4);
    const std::string_view first(out.data(), out_size);
    std::string re((first.size() + 2) / 3 * 4, '\0');
    base64url_encode(first, re.data());
    std::string back(re.size() * 3 / 4 + 1, '\0');
    std::size_t back_size = 0;
    FUZZ_CHECK(base64_decode(re, back.data(), back_size));
    FUZZ_CHECK(std::string_view(back.data(), back_size) == first);
}

// The client's side of the contract (codec.hpp): for the input as a name of each
// type, the client refuses it exactly when the daemon would, and a name it accepts reaches the
// daemon as exactly the canonical name the client computed.
void check_client_path(std::string_view name) {
    using steward::resource_type;
    for (const auto type : {resource_type::shared_memory, resource_type::semaphore, resource_type::file,
                            resource_type::directory, resource_type::noop}) {
        std::string out(name.size() + 2, '\0');
        std::string_view canonical;
        const std::error_code ec = steward::detail::tracking::client_canonical_name(type, name, out.data(), canonical);
        const std::size_t plain_size = plain_message_size(true, type, name);
        std::array<char, max_message_size> plain_line;
        const std::string_view plain_canonical =
            plain_size != 0 ? write_plain_message(true, type, name, plain_line.data()) : std::string_view();
        FUZZ_CHECK(plain_size == 0 || (!ec && plain_canonical == canonical));
        encoded_message raw;
        const bool raw_encoded = !encode_message(command::register_resource, type, name, raw);
        decoded_message m;
        decode_scratch scratch;
        if (ec) {
            FUZZ_CHECK(ec == std::errc::invalid_argument);
            // Whatever the client refuses, the daemon refuses too.
            if (raw_encoded) FUZZ_CHECK(decode_line(raw.view(), m, scratch) != decode_error::none);
            continue;
        }
        FUZZ_CHECK(type != resource_type::noop);
        check_canonical(type, canonical);
        std::array<char, steward::detail::tracking::max_message_size> wire;
        std::size_t size = 0;
        const std::error_code eec = steward::detail::tracking::encode_into(true, type, canonical, wire.data(), size);
        if (eec) {
            FUZZ_CHECK(eec == steward::errc::message_too_long && size == 0 && plain_size == 0);
            continue;
        }
        // The inline encoder takes exactly the names that make a colon line of a shm or semaphore.
        const bool colon_line =
            wire.front() != '{' && (type == resource_type::shared_memory || type == resource_type::semaphore);
        FUZZ_CHECK((plain_size != 0) == colon_line);
        FUZZ_CHECK(plain_size == 0 ||
                   std::string_view(plain_line.data(), plain_size) == std::string_view(wire.data(), size));
        FUZZ_CHECK(decode_line(std::string_view(wire.data(), size), m, scratch) == decode_error::none);
        FUZZ_CHECK(m.cmd == command::register_resource && m.type == type && m.name == canonical);
        if (raw_encoded) {
            // The raw name, sent as it is, names the same object once the daemon canonicalises it.
            FUZZ_CHECK(decode_line(raw.view(), m, scratch) == decode_error::none && m.name == canonical);
        }
    }
}

}  // namespace

// The entry point libFuzzer calls, by that name.
// NOLINTNEXTLINE(readability-identifier-naming)
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    check_line(input);
    check_splitter(input);
    check_base64(input);
    check_client_path(input.substr(0, 600));
    return 0;
}
