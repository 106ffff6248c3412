#define BOOST_TEST_MODULE tracker_codec_test
#include "support/test_support.hpp"

#include "tracker/cleanup.hpp"
#include "tracker/codec.hpp"
#include "tracker/daemon.hpp"
#include "tracker/registry.hpp"
#include "tracker/registry_change_log.hpp"

#include <steward/error.hpp>
#include <steward/unique_fd.hpp>

#include <fcntl.h>
#include <semaphore.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

using namespace steward::detail::tracking;
using steward::resource_type;

namespace {

std::string unique_name(std::string_view stem) {
    static std::atomic<int> counter{0};
    return "/stw_codec_" + std::string(stem) + "_" + std::to_string(::getpid()) + "_" +
           std::to_string(counter++);
}

struct decoded {
    decode_error error;
    command cmd;
    resource_type type;
    std::string name;
};

decoded decode(std::string_view line) {
    decode_scratch scratch;
    decoded_message msg;
    const auto error = decode_line(line, msg, scratch);
    return {error, msg.cmd, msg.type, std::string(msg.name)};
}

std::string encode(command cmd, resource_type type, std::string_view name) {
    encoded_message out;
    const auto ec = encode_message(cmd, type, name, out);
    BOOST_REQUIRE_MESSAGE(!ec, "encode failed: " << ec.message());
    return std::string(out.view());
}

std::string b64(std::string_view s) {
    std::string out((s.size() + 2) / 3 * 4, '\0');
    out.resize(base64url_encode(s, out.data()));
    return out;
}

// Collects what a line_splitter emits, for comparison.
struct split_log {
    std::vector<std::string> lines;
    std::vector<decode_error> errors;
};

split_log split(std::string_view stream, std::size_t chunk) {
    line_splitter splitter;
    split_log log;
    for (std::size_t i = 0; i < stream.size(); i += chunk)
        splitter.feed(
            stream.substr(i, chunk), [&](std::string_view line) { log.lines.emplace_back(line); },
            [&](decode_error e) { log.errors.push_back(e); });
    splitter.finish([&](decode_error e) { log.errors.push_back(e); });
    return log;
}

struct shm_guard {
    std::string name;
    ~shm_guard() { ::shm_unlink(name.c_str()); }
};

bool shm_exists(const std::string& name) {
    return ::access(("/dev/shm" + name).c_str(), F_OK) == 0;
}

}  // namespace

// ---- colon format -------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(colon_lines_decode_with_first_and_last_colon_split) {
    auto d = decode("REGISTER:/psm_1a2b:shared_memory\n");
    BOOST_TEST((d.error == decode_error::none));
    BOOST_TEST((d.cmd == command::register_resource));
    BOOST_TEST((d.type == resource_type::shared_memory));
    BOOST_TEST(d.name == "/psm_1a2b");

    d = decode("UNREGISTER:/a:b:c:semaphore\n");  // ':' inside the name (gh-98896)
    BOOST_TEST((d.error == decode_error::none));
    BOOST_TEST((d.cmd == command::unregister_resource));
    BOOST_TEST((d.type == resource_type::semaphore));
    BOOST_TEST(d.name == "/a:b:c");

    d = decode("PROBE:0:noop\n");
    BOOST_TEST((d.error == decode_error::none));
    BOOST_TEST((d.cmd == command::probe));
    BOOST_TEST((d.type == resource_type::noop));

    d = decode("  REGISTER:/x:file \r\n");  // bytes.strip() semantics
    BOOST_TEST((d.error == decode_error::none));
    BOOST_TEST(d.name == "/x");
}

BOOST_AUTO_TEST_CASE(shm_and_semaphore_names_are_canonicalised_with_one_slash) {
    BOOST_TEST(decode("REGISTER:abc:shared_memory\n").name == "/abc");
    BOOST_TEST(decode("REGISTER:/abc:shared_memory\n").name == "/abc");
    BOOST_TEST(decode("REGISTER:abc:semaphore\n").name == "/abc");
    BOOST_TEST(
        decode("{\"cmd\":\"REGISTER\",\"rtype\":\"semaphore\",\"base64_name\":\"" + b64("abc") + "\"}\n")
            .name == "/abc");
}

BOOST_AUTO_TEST_CASE(file_and_directory_paths_must_be_absolute_and_safe) {
    BOOST_TEST((decode("REGISTER:tmp/x:file\n").error == decode_error::relative_path));
    BOOST_TEST((decode("REGISTER:/:directory\n").error == decode_error::unsafe_path));
    BOOST_TEST((decode("REGISTER://:directory\n").error == decode_error::unsafe_path));
    BOOST_TEST((decode("REGISTER:/tmp/..:directory\n").error == decode_error::unsafe_path));
    BOOST_TEST((decode("REGISTER:/tmp/./x:file\n").error == decode_error::unsafe_path));
    BOOST_TEST((decode("REGISTER:/home/u/..:directory\n").error == decode_error::unsafe_path));
    const auto d = decode("REGISTER://tmp//x/:directory\n");
    BOOST_TEST((d.error == decode_error::none));
    BOOST_TEST(d.name == "/tmp/x");
    BOOST_TEST(decode("REGISTER:/tmp/..x:file\n").name == "/tmp/..x");  // only whole components are refused
}

BOOST_AUTO_TEST_CASE(colon_errors_are_precise) {
    BOOST_TEST((decode("\n").error == decode_error::empty_line));
    BOOST_TEST((decode("   \n").error == decode_error::empty_line));
    BOOST_TEST((decode("REGISTER\n").error == decode_error::missing_separator));
    BOOST_TEST((decode("REGISTER:/x\n").error == decode_error::missing_separator));
    BOOST_TEST((decode("DELETE:/x:shared_memory\n").error == decode_error::unknown_command));
    BOOST_TEST((decode("register:/x:shared_memory\n").error == decode_error::unknown_command));
    BOOST_TEST((decode("REGISTER:/x:dummy\n").error == decode_error::unknown_type));
    BOOST_TEST((decode("PROBE:0:bogus\n").error == decode_error::unknown_type));
    BOOST_TEST((decode("REGISTER:/x:noop\n").error == decode_error::noop_registered));
    BOOST_TEST((decode("UNREGISTER:/x:noop\n").error == decode_error::noop_registered));
    BOOST_TEST((decode("REGISTER::shared_memory\n").error == decode_error::empty_name));
    BOOST_TEST(
        (decode(std::string("REGISTER:/a\0b:shared_memory\n", 28)).error == decode_error::nul_in_name));
    BOOST_TEST((decode("REGISTER:/caf\xc3\xa9:shared_memory\n").error == decode_error::not_ascii));
    for (int e = 0; e <= static_cast<int>(decode_error::unsafe_path); ++e)
        BOOST_TEST(!describe(static_cast<decode_error>(e)).empty());
}

BOOST_AUTO_TEST_CASE(the_512_byte_limit_is_exact_and_includes_the_newline) {
    const std::string head = "REGISTER:/", tail = ":shared_memory\n";
    const std::string at_limit = head + std::string(512 - head.size() - tail.size(), 'n') + tail;
    BOOST_REQUIRE_EQUAL(at_limit.size(), 512u);
    BOOST_TEST((decode(at_limit).error == decode_error::none));
    const std::string over = head + std::string(513 - head.size() - tail.size(), 'n') + tail;
    BOOST_TEST((decode(over).error == decode_error::too_long));

    // The splitter agrees, whatever the chunking.
    for (const std::size_t chunk : {1u, 7u, 511u, 512u, 513u, 4096u}) {
        const auto log = split(at_limit + over + at_limit, chunk);
        BOOST_TEST(log.lines.size() == 2u);
        BOOST_REQUIRE_EQUAL(log.errors.size(), 1u);
        BOOST_TEST((log.errors[0] == decode_error::too_long));
        for (const auto& l : log.lines) BOOST_TEST(l == at_limit);
    }
}

// ---- JSON format --------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(json_lines_decode_in_every_layout_python_produces) {
    const std::string name = "/psm_abc";
    BOOST_TEST(b64(name) == "L3BzbV9hYmM=");  // the value in CPython's own protocol notes
    for (const std::string line : {
             "{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":\"L3BzbV9hYmM=\"}\n",
             "{\"cmd\": \"REGISTER\", \"rtype\": \"shared_memory\", \"base64_name\": \"L3BzbV9hYmM=\"}\n",
             "{\"base64_name\":\"L3BzbV9hYmM\",\"rtype\":\"shared_memory\",\"cmd\":\"REGISTER\",\"x\":[1,{"
             "\"y\":null}]}\n",
             "{\"cmd\":\"\\u0052EGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":\"L3BzbV9hYmM=\"}\n",
             " {\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":\"L3BzbV9hYmM=\"} \n",
         }) {
        const auto d = decode(line);
        BOOST_TEST((d.error == decode_error::none), line);
        BOOST_TEST((d.cmd == command::register_resource));
        BOOST_TEST((d.type == resource_type::shared_memory));
        BOOST_TEST(d.name == name);
    }
}

BOOST_AUTO_TEST_CASE(json_probe_needs_no_name_but_register_does) {
    auto d = decode("{\"cmd\":\"PROBE\",\"rtype\":\"noop\"}\n");
    BOOST_TEST((d.error == decode_error::none));
    BOOST_TEST((d.cmd == command::probe));
    BOOST_TEST((decode("{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\"}\n").error ==
                decode_error::missing_field));
    BOOST_TEST((decode("{\"rtype\":\"noop\"}\n").error == decode_error::missing_field));
    BOOST_TEST((decode("{\"cmd\":\"PROBE\"}\n").error == decode_error::missing_field));
}

BOOST_AUTO_TEST_CASE(json_base64_accepts_both_alphabets_and_optional_padding) {
    // 0xfb 0xff -> "-_8=" URL-safe, "+/8=" standard.
    const std::string raw = "/\xfb\xff";
    for (const std::string enc : {"L_v_", "L/v/", "L_v_"}) {
        const auto d =
            decode("{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":\"" + enc + "\"}\n");
        BOOST_TEST((d.error == decode_error::none), enc);
        BOOST_TEST(d.name == raw);
    }
    const auto d =
        decode("{\"cmd\":\"REGISTER\",\"rtype\":\"file\",\"base64_name\":\"" + b64("/tmp/a") + "\"}");
    BOOST_TEST(d.name == "/tmp/a");
    for (const std::string bad : {"L3BzbV9hYmM", "L3Bz!V9h", "L3BzbV9hYmM===", "L", "L3=z", "AAAAA"}) {
        const auto e =
            decode("{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":\"" + bad + "\"}\n");
        if (bad == "L3BzbV9hYmM") {
            BOOST_TEST((e.error == decode_error::none));  // unpadded is accepted
        } else {
            BOOST_TEST((e.error == decode_error::bad_base64), bad);
        }
    }
}

BOOST_AUTO_TEST_CASE(json_errors_are_precise) {
    BOOST_TEST((decode("{\n").error == decode_error::bad_json));
    BOOST_TEST((decode("{}\n").error == decode_error::missing_field));
    BOOST_TEST((decode("{\"cmd\":\"PROBE\",\"rtype\":\"noop\"} x\n").error == decode_error::bad_json));
    BOOST_TEST((decode("{\"cmd\":\"PROBE\",\"rtype\":\"noop\",}\n").error == decode_error::bad_json));
    BOOST_TEST((decode("{\"cmd\":\"PROBE\" \"rtype\":\"noop\"}\n").error == decode_error::bad_json));
    BOOST_TEST((decode("{\"cmd\":\"a\tb\",\"rtype\":\"noop\"}\n").error == decode_error::bad_json));
    BOOST_TEST(
        (decode("{\"cmd\":\"PROBE\",\"rtype\":\"noop\",\"z\":01x}\n").error == decode_error::bad_json));
    BOOST_TEST((decode("{\"cmd\":1,\"rtype\":\"noop\"}\n").error == decode_error::field_not_string));
    BOOST_TEST((decode("{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":null}\n").error ==
                decode_error::field_not_string));
    BOOST_TEST((decode("{\"cmd\":\"KILL\",\"rtype\":\"noop\"}\n").error == decode_error::unknown_command));
    BOOST_TEST((decode("{\"cmd\":\"REGISTER\",\"rtype\":\"dummy\",\"base64_name\":\"YQ==\"}\n").error ==
                decode_error::unknown_type));
    BOOST_TEST((decode("{\"cmd\":\"REGISTER\",\"rtype\":\"noop\",\"base64_name\":\"YQ==\"}\n").error ==
                decode_error::noop_registered));
    BOOST_TEST((decode("{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":\"\"}\n").error ==
                decode_error::empty_name));
    BOOST_TEST((decode("{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":\"" +
                       b64(std::string("a\0b", 3)) + "\"}\n")
                    .error == decode_error::nul_in_name));
    std::string deep =
        "{\"cmd\":\"PROBE\",\"rtype\":\"noop\",\"x\":" + std::string(100, '[') + std::string(100, ']') + "}";
    BOOST_TEST((decode(deep).error == decode_error::bad_json));  // nesting is bounded
}

// ---- encoding -----------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(encoder_picks_colon_for_plain_names_and_json_otherwise) {
    BOOST_TEST(encode(command::register_resource, resource_type::shared_memory, "/psm_x") ==
               "REGISTER:/psm_x:shared_memory\n");
    BOOST_TEST(encode(command::unregister_resource, resource_type::semaphore, "/mp-1 2") ==
               "UNREGISTER:/mp-1 2:semaphore\n");
    BOOST_TEST(encode(command::probe, resource_type::noop, "") == "PROBE:0:noop\n");
    BOOST_TEST(encode(command::register_resource, resource_type::shared_memory, "/a:b") ==
               "{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":\"" + b64("/a:b") +
                   "\"}\n");
    BOOST_TEST(needs_json("/a\nb"));
    BOOST_TEST(needs_json("/caf\xc3\xa9"));
    BOOST_TEST(needs_json("/tab\t"));
    BOOST_TEST(!needs_json("/plain name~"));

    // Round trip: what we encode, we decode to the same message, for many awkward names.
    std::mt19937 rng(12345);
    std::vector<std::string> names = {"/a:b", "/a\nb", "/caf\xc3\xa9", "/\xff\xfe", "/x{y}\"z\\", "/sp ace"};
    for (int i = 0; i < 2000; ++i) {
        std::string n = "/";
        const int len = 1 + static_cast<int>(rng() % 60);
        for (int k = 0; k < len; ++k) n += static_cast<char>(1 + rng() % 255);
        names.push_back(n);
    }
    for (const auto& n : names) {
        for (const auto cmd : {command::register_resource, command::unregister_resource}) {
            const std::string line = encode(cmd, resource_type::shared_memory, n);
            BOOST_TEST(line.size() <= max_message_size);
            BOOST_TEST(line.back() == '\n');
            BOOST_TEST(std::count(line.begin(), line.end(), '\n') == 1);  // one line, whatever the name
            const auto d = decode(line);
            BOOST_TEST((d.error == decode_error::none));
            BOOST_TEST((d.cmd == cmd));
            BOOST_TEST(d.name == n);
        }
    }
}

// The client's inline encoder must agree with the general one byte for byte, and decline (never
// mis-encode) everything else. Every byte value at every position of names of 1 to 17 bytes
// exercises each lane of the eight-byte steps and the padded tail.
BOOST_AUTO_TEST_CASE(inline_plain_encoder_agrees_with_the_general_encoder_or_declines) {
    const auto general = [](bool reg, resource_type type,
                            std::string_view name) -> std::optional<std::string> {
        std::array<char, max_message_size + 2> canonical_buf;
        std::string_view canonical;
        if (client_canonical_name(type, name, canonical_buf.data(), canonical)) return std::nullopt;
        std::array<char, max_message_size> out;
        std::size_t size = 0;
        if (encode_into(reg, type, canonical, out.data(), size)) return std::nullopt;
        return std::string(out.data(), size);
    };
    std::size_t accepted = 0, declined = 0;
    const auto check = [&](bool reg, resource_type type, const std::string& name) {
        std::array<char, max_message_size> out;
        const std::size_t size = plain_message_size(reg, type, name);
        const bool inline_ok = size != 0;
        const std::string_view canonical = inline_ok ? write_plain_message(reg, type, name, out.data()) : "";
        const bool expect_inline =
            (type == resource_type::shared_memory || type == resource_type::semaphore) && !name.empty() &&
            !needs_json(name) && general(reg, type, name).has_value();
        BOOST_REQUIRE_MESSAGE(
            inline_ok == expect_inline,
            "name of " << name.size() << " bytes, type " << to_string(type) << ", byte values " << [&] {
                std::string v;
                for (unsigned char c : name) v += std::to_string(c) + ' ';
                return v;
            }());
        if (!inline_ok) {
            ++declined;
            return;
        }
        ++accepted;
        const auto expected = general(reg, type, name);
        BOOST_REQUIRE(std::string(out.data(), size) == *expected);
        // The canonical name points at the name inside the line (after "REGISTER:"/"UNREGISTER:").
        BOOST_REQUIRE(canonical.data() >= out.data() &&
                      canonical.data() + canonical.size() <= out.data() + size);
        BOOST_REQUIRE(canonical == (name.front() == '/' ? name : "/" + name));
    };
    for (std::size_t len = 1; len <= 17; ++len)
        for (std::size_t pos = 0; pos < len; ++pos)
            for (unsigned v = 0; v < 256; ++v) {
                std::string name(len, 'q');
                name[pos] = static_cast<char>(v);
                check(v % 2 == 0, v % 3 == 0 ? resource_type::semaphore : resource_type::shared_memory, name);
            }
    // Other types, the empty name and the length limit are declined.
    for (const auto type : {resource_type::file, resource_type::directory, resource_type::noop})
        check(true, type, "/plain");
    check(true, resource_type::shared_memory, "");
    for (std::size_t len = 480; len <= 500; ++len) {
        std::string name(len, 'a');
        check(false, resource_type::shared_memory, name);  // '/' prepended
        name.front() = '/';
        check(false, resource_type::shared_memory, name);
    }
    BOOST_TEST(accepted > 0u);
    BOOST_TEST(declined > 0u);
}

BOOST_AUTO_TEST_CASE(encoder_refuses_over_512_bytes_and_bad_arguments) {
    // Colon: REGISTER: + name + :shared_memory\n = 9 + n + 15.
    const std::string ok_name = "/" + std::string(512 - 24 - 1, 'a');
    encoded_message out;
    BOOST_TEST(!encode_message(command::register_resource, resource_type::shared_memory, ok_name, out));
    BOOST_TEST(out.size == 512u);
    const std::string long_name = ok_name + "a";
    auto ec = encode_message(command::register_resource, resource_type::shared_memory, long_name, out);
    BOOST_TEST((ec == steward::errc::message_too_long));
    BOOST_TEST(out.size == 0u);
    std::string buffer = "keep";
    BOOST_TEST((append_message(command::register_resource, resource_type::shared_memory, long_name, buffer) ==
                steward::errc::message_too_long));
    BOOST_TEST(buffer == "keep");  // nothing appended on error
    BOOST_TEST(!append_message(command::register_resource, resource_type::shared_memory, ok_name, buffer));
    BOOST_TEST(buffer.size() == 4u + 512u);

    // JSON: the limit applies to the encoded form; find the boundary by growing the name.
    std::string name = "/\n";
    std::size_t last_ok = 0;
    for (;; name += 'x') {
        ec = encode_message(command::unregister_resource, resource_type::shared_memory, name, out);
        if (ec) break;
        last_ok = out.size;
    }
    BOOST_TEST((ec == steward::errc::message_too_long));
    BOOST_TEST(last_ok <= 512u);
    BOOST_TEST(last_ok > 508u);

    BOOST_TEST((encode_message(command::register_resource, resource_type::noop, "/x", out) ==
                std::errc::invalid_argument));
    BOOST_TEST((encode_message(command::register_resource, resource_type::file, "", out) ==
                std::errc::invalid_argument));
    BOOST_TEST((encode_message(command::register_resource, resource_type::file, std::string("/a\0", 3),
                               out) == std::errc::invalid_argument));
}

// ---- garbage ------------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(random_garbage_never_crashes_and_successes_are_well_formed) {
    // Mutations of valid messages (byte flips, cuts, insertions) plus raw noise: decoding must
    // never crash, and anything accepted must be a well-formed message that survives a re-encode.
    std::mt19937 rng(777);
    const std::vector<std::string> seeds = {
        "REGISTER:/psm_abc:shared_memory\n",
        "UNREGISTER:/a:b:semaphore\n",
        "PROBE:0:noop\n",
        "{\"cmd\":\"REGISTER\",\"rtype\":\"file\",\"base64_name\":\"L3RtcC94\"}\n",
        "{\"cmd\": \"PROBE\", \"rtype\": \"noop\"}\n",
        "REGISTER:/tmp/d:directory\n"};
    int accepted = 0, refused = 0;
    for (int i = 0; i < 60000; ++i) {
        std::string line = seeds[rng() % seeds.size()];
        const int edits = 1 + static_cast<int>(rng() % 3);
        for (int k = 0; k < edits && !line.empty(); ++k) {
            const std::size_t at = rng() % line.size();
            switch (rng() % 4) {
                case 0:
                    line[at] = static_cast<char>(rng() % 256);
                    break;
                case 1:
                    line.erase(at, 1 + rng() % 4);
                    break;
                case 2:
                    line.insert(at, 1, static_cast<char>(rng() % 256));
                    break;
                case 3:
                    line = line.substr(0, at);
                    break;
            }
        }
        if (i % 10 == 0) {
            line.clear();
            for (int k = static_cast<int>(rng() % 80); k > 0; --k) line += static_cast<char>(rng() % 256);
        }
        const auto d = decode(line);
        if (d.error != decode_error::none) {
            ++refused;
            continue;
        }
        ++accepted;
        if (d.cmd == command::probe) continue;
        BOOST_REQUIRE(!d.name.empty());
        BOOST_REQUIRE(d.name.find('\0') == std::string::npos);
        if (d.type == resource_type::shared_memory || d.type == resource_type::semaphore)
            BOOST_REQUIRE(d.name.front() == '/');
        encoded_message again;
        BOOST_REQUIRE(!encode_message(d.cmd, d.type, d.name, again));
        const auto d2 = decode(again.view());
        BOOST_REQUIRE((d2.error == decode_error::none));
        BOOST_REQUIRE(d2.name == d.name);
        BOOST_REQUIRE((d2.type == d.type && d2.cmd == d.cmd));
    }
    BOOST_TEST(accepted > 1000);  // the mutations do reach the success paths
    BOOST_TEST(refused > 10000);
}

// ---- line splitting -----------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(splitter_handles_lines_across_chunks_and_reports_partial_and_oversized) {
    std::string stream;
    std::vector<std::string> expected;
    for (int i = 0; i < 200; ++i) {
        std::string l = "REGISTER:/n" + std::to_string(i) +
                        std::string(static_cast<std::size_t>(i * 7 % 300), 'p') + ":shared_memory\n";
        expected.push_back(l);
        stream += l;
        if (i == 50) stream += std::string(2000, 'X') + "\n";  // oversized, spans many chunks
        if (i == 120) stream += std::string(513, 'Y') + "\n";
    }
    for (std::size_t chunk = 1; chunk < 700; chunk += (chunk < 20 ? 1 : 37)) {
        const auto log = split(stream + "REGISTER:/tail", chunk);
        BOOST_TEST(log.lines == expected, "chunk " << chunk);
        BOOST_REQUIRE_EQUAL(log.errors.size(), 3u);
        BOOST_TEST((log.errors[0] == decode_error::too_long));
        BOOST_TEST((log.errors[1] == decode_error::too_long));
        BOOST_TEST((log.errors[2] == decode_error::partial_line));
    }
    // An oversized line still unterminated at EOF is reported once, as too long.
    const auto log = split("PROBE:0:noop\n" + std::string(600, 'Z'), 100);
    BOOST_TEST(log.lines.size() == 1u);
    BOOST_REQUIRE_EQUAL(log.errors.size(), 1u);
    BOOST_TEST((log.errors[0] == decode_error::too_long));
}

// ---- registry -----------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(registry_collapses_duplicates_and_keeps_types_apart) {
    registry r;
    auto [h1, fresh1] = r.insert(resource_type::shared_memory, "/a");
    auto [h2, fresh2] = r.insert(resource_type::shared_memory, "/a");
    BOOST_TEST(fresh1);
    BOOST_TEST(!fresh2);
    BOOST_TEST(h1 == h2);
    BOOST_TEST(r.insert(resource_type::semaphore, "/a").second);
    BOOST_TEST(r.size() == 2u);
    BOOST_TEST(r.size(resource_type::shared_memory) == 1u);
    BOOST_TEST(!r.erase(resource_type::file, "/a"));
    BOOST_TEST(r.erase(resource_type::shared_memory, "/a"));
    BOOST_TEST(!r.erase(resource_type::shared_memory, "/a"));
    BOOST_TEST(r.find(resource_type::semaphore, "/a") != registry::no_handle);
    BOOST_TEST(r.find(resource_type::shared_memory, "/a") == registry::no_handle);
    BOOST_TEST(r.size() == 1u);
}

BOOST_AUTO_TEST_CASE(registry_lookup_depends_only_on_the_name_bytes) {
    // The same name seen through different buffers (with different bytes after it) is found,
    // whatever its length: hashing must never look past the end of the name.
    registry r;
    std::mt19937 rng(99);
    for (std::size_t len = 1; len <= 120; ++len) {
        std::string name(len, '\0');
        for (auto& c : name) c = static_cast<char>('a' + rng() % 26);
        const std::string stored = name + std::string(32, 'X');
        const std::string probe = name + std::string(32, 'Y');
        BOOST_REQUIRE(r.insert(resource_type::shared_memory, std::string_view(stored).substr(0, len)).second);
        BOOST_TEST(r.find(resource_type::shared_memory, std::string_view(probe).substr(0, len)) !=
                       registry::no_handle,
                   "length " << len);
        BOOST_TEST(!r.insert(resource_type::shared_memory, std::string_view(probe).substr(0, len)).second);
    }
}

BOOST_AUTO_TEST_CASE(registry_survives_growth_churn_and_compaction) {
    registry r;
    const int n = 50000;
    for (int i = 0; i < n; ++i) r.insert(resource_type::file, "/f/" + std::to_string(i));
    for (int i = 0; i < n; i += 2) BOOST_REQUIRE(r.erase(resource_type::file, "/f/" + std::to_string(i)));
    const steward::detail::tracking::file_identity id{7, 99};
    r.set_identity(r.find(resource_type::file, "/f/1"), &id);
    // Churn: register and unregister many fresh names; memory must not grow with the churn.
    for (int round = 0; round < 4; ++round) {
        for (int i = 0; i < n; ++i) r.insert(resource_type::shared_memory, "/churn" + std::to_string(i));
        for (int i = 0; i < n; ++i)
            BOOST_REQUIRE(r.erase(resource_type::shared_memory, "/churn" + std::to_string(i)));
        r.compact();
    }
    BOOST_TEST(r.size() == static_cast<std::size_t>(n / 2));
    for (int i = 0; i < n; ++i) {
        const bool present = r.find(resource_type::file, "/f/" + std::to_string(i)) != registry::no_handle;
        BOOST_REQUIRE(present == (i % 2 == 1));
    }
    const auto h = r.find(resource_type::file, "/f/1");
    BOOST_REQUIRE(r.identity(h).has_value());
    BOOST_TEST(r.identity(h)->ino == 99u);
    BOOST_TEST(r.memory_bytes() < std::size_t{n / 2} * 200);
}

// The client records its registrations and applies them in bulk: at every moment, applying the
// record must give the set that applying each change at once gives.
BOOST_AUTO_TEST_CASE(registry_change_log_gives_the_same_set_as_immediate_changes) {
    registry immediate, logged;
    registry_change_log log;
    std::mt19937 rng(2026);
    const auto name_of = [](unsigned i) { return "/n" + std::to_string(i) + std::string(i % 40, 'x'); };
    unsigned i = 0;
    for (int step = 0; step < 200000; ++step) {
        // Half the time the name of the step before (a change replaces the last record then, when
        // the type matches too).
        if (rng() % 2 == 0) i = static_cast<unsigned>(rng() % 3000);
        const bool insert = rng() % 3 != 0;
        const auto type = rng() % 2 ? resource_type::semaphore : resource_type::shared_memory;
        if (insert) {
            (void)immediate.insert(type, name_of(i));
        } else if (immediate.erase(type, name_of(i))) {
            (void)immediate.compact();
        }
        log.record(logged, insert, type, name_of(i));
        if (step % 20011 == 0) {  // now and then the set is read (apply first), as the client does
            log.apply(logged);
            BOOST_REQUIRE(log.empty());
            BOOST_REQUIRE(logged.size() == immediate.size());
        }
    }
    log.apply(logged);
    BOOST_TEST(logged.size() == immediate.size());
    for (unsigned k = 0; k < 3000; ++k)
        for (const auto type : {resource_type::semaphore, resource_type::shared_memory})
            BOOST_REQUIRE((logged.find(type, name_of(k)) == registry::no_handle) ==
                          (immediate.find(type, name_of(k)) == registry::no_handle));
    // Forgetting the record leaves the set as it was when last applied.
    log.record(logged, true, resource_type::file, "/forgotten");
    log.clear();
    log.apply(logged);
    BOOST_TEST(logged.find(resource_type::file, "/forgotten") == registry::no_handle);

    // A name longer than a record can hold is applied at once, after the changes recorded before
    // it; when the registry refuses it, those changes are not lost.
    log.record(logged, true, resource_type::file, "/kept");
    BOOST_CHECK_THROW(log.record(logged, true, resource_type::file, "/" + std::string(70000, 'x')),
                      std::length_error);
    BOOST_TEST(log.empty());
    BOOST_TEST(logged.find(resource_type::file, "/kept") != registry::no_handle);
}

BOOST_AUTO_TEST_CASE(registry_costs_at_most_64_bytes_per_name_plus_the_name) {
    registry r;
    const std::size_t n = 300000;
    std::size_t name_bytes = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const std::string name = "/psm_" + std::to_string(i * 2654435761u);
        name_bytes += name.size();
        r.insert(resource_type::shared_memory, name);
    }
    const double overhead = static_cast<double>(r.memory_bytes() - name_bytes) / static_cast<double>(n);
    BOOST_TEST_MESSAGE("registry overhead: " << overhead << " bytes per name");
    BOOST_TEST(overhead <= 64.0);
}

// ---- cleanup ------------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(remove_tree_never_follows_symlinks_and_refuses_unsafe_paths) {
    namespace fs = std::filesystem;
    const fs::path base = fs::temp_directory_path() / ("stw_tree_" + std::to_string(::getpid()));
    const fs::path outside = base / "outside";
    const fs::path tree = base / "tree";
    fs::create_directories(outside / "keep_dir");
    std::ofstream(outside / "keep.txt") << "precious";
    fs::create_directories(tree / "a" / "b" / "c");
    std::ofstream(tree / "a" / "b" / "c" / "f") << "x";
    std::ofstream(tree / "top") << "y";
    fs::create_directory_symlink(outside, tree / "a" / "link_to_outside");
    fs::create_symlink(outside / "keep.txt", tree / "file_link");

    std::vector<std::string> failures;
    const failure_callback record = [&](std::string_view what, std::error_code ec) {
        failures.push_back(std::string(what) + ": " + ec.message());
    };
    std::error_code ec;
    const auto id = lookup_identity(resource_type::directory, tree.string(), ec);
    BOOST_REQUIRE(id.has_value());
    BOOST_TEST((remove_tree(tree.string(), id, record) == cleanup_result::removed));
    BOOST_TEST(failures.empty());
    BOOST_TEST(!fs::exists(fs::symlink_status(tree)));
    BOOST_TEST(fs::exists(outside / "keep.txt"));
    BOOST_TEST(fs::exists(outside / "keep_dir"));
    BOOST_TEST((remove_tree(tree.string(), std::nullopt, record) == cleanup_result::already_gone));

    // A symlink registered as a directory: the link goes, the target stays.
    fs::create_directory_symlink(outside, base / "dirlink");
    BOOST_TEST((remove_tree((base / "dirlink").string(), std::nullopt, record) == cleanup_result::removed));
    BOOST_TEST(fs::exists(outside / "keep.txt"));
    BOOST_TEST(!fs::exists(fs::symlink_status(base / "dirlink")));

    for (const std::string& bad : std::vector<std::string>{"relative/dir", "/", "//", (base / "..").string(),
                                                           base.string() + "/./outside"}) {
        failures.clear();
        BOOST_TEST((remove_tree(bad, std::nullopt, record) == cleanup_result::failed), bad);
        BOOST_TEST(failures.size() == 1u);
    }
    BOOST_TEST(fs::exists(outside / "keep.txt"));

    // Replaced since registration: left alone. Holding the old directory open keeps its inode
    // number from being reused, so the replacement is a different object for sure.
    fs::create_directory(base / "re");
    const auto old_id = lookup_identity(resource_type::directory, (base / "re").string(), ec);
    const steward::unique_fd hold{::open((base / "re").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
    fs::remove(base / "re");
    fs::create_directory(base / "re");
    std::ofstream(base / "re" / "theirs") << "not ours";
    const auto new_id = lookup_identity(resource_type::directory, (base / "re").string(), ec);
    BOOST_REQUIRE(old_id && new_id);
    BOOST_REQUIRE(*old_id != *new_id);
    BOOST_TEST((remove_tree((base / "re").string(), old_id, record) == cleanup_result::replaced));
    BOOST_TEST(fs::exists(base / "re" / "theirs"));
    BOOST_TEST((remove_tree((base / "re").string(), new_id, record) == cleanup_result::removed));
    fs::remove_all(base);
}

BOOST_AUTO_TEST_CASE(remove_resource_unlinks_shm_semaphores_and_files_with_identity_check) {
    const failure_callback none = [](std::string_view what, std::error_code ec) {
        BOOST_ERROR("unexpected failure " << what << ": " << ec.message());
    };
    shm_guard shm{unique_name("shm")};
    {
        steward::unique_fd fd{::shm_open(shm.name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600)};
        BOOST_REQUIRE(fd);
    }
    std::error_code ec;
    const auto id = lookup_identity(resource_type::shared_memory, shm.name.substr(1), ec);  // "abc" == "/abc"
    BOOST_REQUIRE(id.has_value());
    BOOST_TEST(
        (remove_resource(resource_type::shared_memory, shm.name, id, none) == cleanup_result::removed));
    BOOST_TEST(!shm_exists(shm.name));
    BOOST_TEST((remove_resource(resource_type::shared_memory, shm.name, std::nullopt, none) ==
                cleanup_result::already_gone));

    const std::string sem_name = unique_name("sem");
    sem_t* sem = ::sem_open(sem_name.c_str(), O_CREAT | O_EXCL, 0600, 0);
    BOOST_REQUIRE(sem != SEM_FAILED);
    ::sem_close(sem);
    BOOST_TEST(::access(("/dev/shm/sem." + sem_name.substr(1)).c_str(), F_OK) == 0);
    const auto sem_id = lookup_identity(resource_type::semaphore, sem_name, ec);
    BOOST_REQUIRE(sem_id.has_value());
    BOOST_TEST(
        (remove_resource(resource_type::semaphore, sem_name, sem_id, none) == cleanup_result::removed));
    BOOST_TEST(::access(("/dev/shm/sem." + sem_name.substr(1)).c_str(), F_OK) != 0);

    // A file replaced by another object under the same name is left alone (the old one is held
    // open so its inode number cannot be reused by the replacement).
    const std::string path = std::filesystem::temp_directory_path().string() + unique_name("file");
    std::ofstream(path) << "1";
    const auto fid = lookup_identity(resource_type::file, path, ec);
    const steward::unique_fd hold{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
    ::unlink(path.c_str());
    std::ofstream(path) << "2";
    const auto fid2 = lookup_identity(resource_type::file, path, ec);
    BOOST_REQUIRE(fid && fid2);
    BOOST_REQUIRE(*fid != *fid2);
    BOOST_TEST((remove_resource(resource_type::file, path, fid, none) == cleanup_result::replaced));
    BOOST_TEST(::access(path.c_str(), F_OK) == 0);
    BOOST_TEST((remove_resource(resource_type::file, path, fid2, none) == cleanup_result::removed));
    BOOST_TEST(::access(path.c_str(), F_OK) != 0);

    // A failure is reported with the name and the error.
    std::vector<std::string> failures;
    const std::string dir = std::filesystem::temp_directory_path().string() + unique_name("dir_as_file");
    std::filesystem::create_directory(dir);
    BOOST_TEST((remove_resource(resource_type::file, dir, std::nullopt,
                                [&](std::string_view what, std::error_code e) {
                                    failures.push_back(std::string(what));
                                    BOOST_TEST((e == std::errc::is_a_directory));
                                }) == cleanup_result::failed));
    BOOST_TEST(failures == std::vector<std::string>{dir});
    std::filesystem::remove(dir);
}

BOOST_AUTO_TEST_CASE(dev_shm_listing_reports_the_same_identities_as_lstat) {
    shm_guard shm{unique_name("scan")};
    {
        steward::unique_fd fd{::shm_open(shm.name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600)};
        BOOST_REQUIRE(fd);
    }
    const std::string sem_name = unique_name("scan_sem");
    sem_t* sem = ::sem_open(sem_name.c_str(), O_CREAT | O_EXCL, 0600, 0);
    BOOST_REQUIRE(sem != SEM_FAILED);
    ::sem_close(sem);
    std::optional<file_identity> seen_shm, seen_sem;
    const bool complete =
        scan_shm_directory(1000000, [&](resource_type t, std::string_view n, const file_identity& id) {
            if (t == resource_type::shared_memory && n == shm.name) seen_shm = id;
            if (t == resource_type::semaphore && n == sem_name) seen_sem = id;
        });
    std::error_code ec;
    BOOST_TEST(complete);
    BOOST_REQUIRE(seen_shm.has_value());
    BOOST_REQUIRE(seen_sem.has_value());
    BOOST_TEST((*seen_shm == *lookup_identity(resource_type::shared_memory, shm.name, ec)));
    BOOST_TEST((*seen_sem == *lookup_identity(resource_type::semaphore, sem_name, ec)));
    // Bounded: a listing longer than allowed gives up instead of running on.
    BOOST_TEST(!scan_shm_directory(1, [](resource_type, std::string_view, const file_identity&) {}));
    ::sem_unlink(sem_name.c_str());
}

// ---- daemon core, in process --------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(daemon_core_tracks_across_chunks_and_reports_in_cpython_words) {
    int p[2];
    BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    steward::unique_fd rd{p[0]}, wr{p[1]};
    shm_guard a{unique_name("core_a")}, b{unique_name("core_b")};
    {
        steward::unique_fd fd{::shm_open(a.name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600)};
        BOOST_REQUIRE(fd);
    }
    int status = -1;
    {
        daemon_core core(wr.get());
        std::string stream = "REGISTER:" + a.name.substr(1) + ":shared_memory\n";  // without the slash
        stream += "REGISTER:" + a.name + ":shared_memory\n";                       // same object
        stream += "REGISTER:" + b.name + ":shared_memory\n";
        stream += "UNREGISTER:" + b.name + ":shared_memory\n";
        stream += "PROBE:0:noop\n";
        for (std::size_t i = 0; i < stream.size(); i += 5) {
            core.ingest(std::string_view(stream).substr(i, 5));
            core.end_of_batch();
        }
        BOOST_TEST(core.tracked().size() == 1u);
        BOOST_TEST(core.malformed() == 0u);
        status = core.finish();
    }
    wr.reset();
    std::string report(4096, '\0');
    report.resize(static_cast<std::size_t>(::read(rd.get(), report.data(), report.size())));
    BOOST_TEST(status == exit_leaks_cleaned);
    BOOST_TEST(
        report ==
        "steward-tracker: There appear to be 1 leaked shared_memory objects to clean up at shutdown: {'" +
            a.name + "'}\n");
    BOOST_TEST(!shm_exists(a.name));
}

BOOST_AUTO_TEST_CASE(quoting_matches_python_repr_for_common_cases) {
    std::string out;
    append_quoted(out, "/a'b\\c\nd\x01\xc3\xa9\xff");
    BOOST_TEST(out == "'/a\\'b\\\\c\\nd\\x01\xc3\xa9\\xff'");
}
