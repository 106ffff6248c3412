#define BOOST_TEST_MODULE sharer_codec_test
#include "support/python3.hpp"
#include "support/test_support.hpp"

#include <steward/error.hpp>
#include <steward/share_id.hpp>

#include "sharer/framing.hpp"
#include "sharer/native_protocol.hpp"
#include "sharer/native_stream.hpp"
#include "sharer/pickle.hpp"
#include "sharer/quick_connect.hpp"

#include <fcntl.h>

#include <map>
#include <random>
#include <sstream>

using steward::test::bytes_of;
using steward::test::from_hex;
using steward::test::to_hex;
namespace framing = steward::detail::framing;
namespace pickle = steward::detail::pickle;
namespace native = steward::detail::native;

namespace {

std::vector<std::byte> header_bytes(std::uint64_t n) {
    std::array<std::byte, framing::max_header_size> h{};
    const std::size_t len = framing::encode_header(n, h);
    return {h.begin(), h.begin() + static_cast<std::ptrdiff_t>(len)};
}

}  // namespace

// ---- multiprocessing.connection framing -------------------------------------------------------

BOOST_AUTO_TEST_CASE(frame_header_known_bytes) {
    BOOST_TEST(to_hex(header_bytes(0)) == "00000000");
    BOOST_TEST(to_hex(header_bytes(19)) == "00000013");
    BOOST_TEST(to_hex(header_bytes(0x7fffffff)) == "7fffffff");
    BOOST_TEST(to_hex(header_bytes(0x80000000ULL)) == "ffffffff0000000080000000");
    BOOST_TEST(to_hex(header_bytes(0x123456789aULL)) == "ffffffff000000123456789a");
}

BOOST_AUTO_TEST_CASE(frame_probe_need_more_then_frame) {
    const auto frame = framing::make_frame(bytes_of("hello"));
    BOOST_TEST(to_hex(frame) == "0000000568656c6c6f");
    for (std::size_t n = 0; n < frame.size(); ++n) {
        const auto p = framing::probe_frame(std::span(frame).first(n), 256);
        BOOST_TEST((p.status == framing::frame_status::need_more));
        BOOST_TEST(p.missing == (n < 4 ? 4 - n : frame.size() - n));
        BOOST_TEST(p.header_size == (n < 4 ? 0u : 4u));
    }
    auto with_more = frame;
    with_more.push_back(std::byte{0});  // the next frame's first byte does not disturb this one
    const auto p = framing::probe_frame(with_more, 256);
    BOOST_TEST((p.status == framing::frame_status::frame));
    BOOST_TEST(p.header_size == 4u);
    BOOST_TEST(p.payload_size == 5u);
    BOOST_TEST(p.total_size() == 9u);
}

BOOST_AUTO_TEST_CASE(frame_probe_limits_without_allocating) {
    // 257 > 256 is refused from the 4 header bytes alone; 256 is fine.
    BOOST_TEST((framing::probe_frame(header_bytes(257), 256).status == framing::frame_status::too_large));
    const auto ok = framing::probe_frame(header_bytes(256), 256);
    BOOST_TEST((ok.status == framing::frame_status::need_more));
    BOOST_TEST(ok.missing == 256u);
    // A 2^62-byte frame announced with the -1 form: too large, decided from 12 bytes.
    const auto huge = header_bytes(1ULL << 62);
    BOOST_TEST(huge.size() == 12u);
    BOOST_TEST((framing::probe_frame(std::span(huge).first(11), 1 << 20).status ==
                framing::frame_status::need_more));
    BOOST_TEST(framing::probe_frame(std::span(huge).first(11), 1 << 20).missing == 1u);
    BOOST_TEST((framing::probe_frame(huge, 1 << 20).status == framing::frame_status::too_large));
    // The -1 form with a small length is what CPython would accept too.
    const auto small_long_form = from_hex("ffffffff0000000000000002abcd");
    const auto p = framing::probe_frame(small_long_form, 256);
    BOOST_TEST((p.status == framing::frame_status::frame));
    BOOST_TEST(p.header_size == 12u);
    BOOST_TEST(p.payload_size == 2u);
    // Negative lengths other than -1.
    BOOST_TEST((framing::probe_frame(from_hex("80000000"), 256).status == framing::frame_status::malformed));
    BOOST_TEST((framing::probe_frame(from_hex("fffffffe"), 256).status == framing::frame_status::malformed));
}

BOOST_AUTO_TEST_CASE(frame_round_trip_random, *boost::unit_test::timeout(30)) {
    std::mt19937_64 rng(42);
    std::vector<std::byte> stream;
    std::vector<std::vector<std::byte>> sent;
    for (int i = 0; i < 200; ++i) {
        std::vector<std::byte> payload(rng() % 300);
        for (auto& b : payload) b = static_cast<std::byte>(rng());
        framing::append_frame(stream, payload);
        sent.push_back(std::move(payload));
    }
    std::size_t pos = 0;
    for (const auto& expected : sent) {
        const auto p = framing::probe_frame(std::span(stream).subspan(pos), 1000);
        BOOST_REQUIRE((p.status == framing::frame_status::frame));
        const auto got = std::span(stream).subspan(pos + p.header_size, p.payload_size);
        BOOST_TEST(std::equal(got.begin(), got.end(), expected.begin(), expected.end()));
        pos += p.total_size();
    }
    BOOST_TEST(pos == stream.size());
}

// ---- pickle subset ---------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(pickle_encode_matches_documented_bytes) {
    // Bytes from cpython-protocols.md and from CPython 3.11's pickle.dumps.
    auto hex = [](std::string_view spaced) { return to_hex(from_hex(spaced)); };
    BOOST_TEST(to_hex(pickle::encode_request({0, 7}, 7917)) ==
               hex("80 04 95 08 00 00 00 00 00 00 00 4b 07 4d ed 1e 86 94 2e"));
    BOOST_TEST(to_hex(pickle::encode_request({0, 1}, 123456)) ==
               hex("80 04 95 0a 00 00 00 00 00 00 00 4b 01 4a 40 e2 01 00 86 94 2e"));
    BOOST_TEST(to_hex(pickle::encode_none()) == hex("80 04 4e 2e"));
    // Protocol 2/3 (no FRAME, BINPUT instead of MEMOIZE) and 5.
    BOOST_TEST(to_hex(pickle::encode_request({0, 7}, 7917, 2)) == hex("80 02 4b 07 4d ed 1e 86 71 00 2e"));
    BOOST_TEST(to_hex(pickle::encode_request({0, 7}, 7917, 5)) ==
               hex("80 05 95 08 00 00 00 00 00 00 00 4b 07 4d ed 1e 86 94 2e"));
    // 2^31 needs LONG1 with a 0x00 sign byte; 2^128-1 needs 17 bytes (Python ints are signed).
    BOOST_TEST(to_hex(pickle::encode_request({0, 0x80000000ULL}, 5)) ==
               hex("80 04 95 0c 00 00 00 00 00 00 00 8a 05 00 00 00 80 00 4b 05 86 94 2e"));
    BOOST_TEST(
        to_hex(pickle::encode_request({~0ULL, ~0ULL}, 1)) ==
        hex("80 04 95 18 00 00 00 00 00 00 00 8a 11 ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff 00 "
            "4b 01 86 94 2e"));
    BOOST_TEST(
        to_hex(pickle::encode_request({0x8000000000000000ULL, 0}, 1)) ==
        hex("80 04 95 18 00 00 00 00 00 00 00 8a 11 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 80 00 "
            "4b 01 86 94 2e"));
    BOOST_TEST(
        to_hex(pickle::encode_request({1, 0}, 70000)) ==
        hex("80 04 95 13 00 00 00 00 00 00 00 8a 09 00 00 00 00 00 00 00 00 01 4a 70 11 01 00 86 94 2e"));
}

BOOST_AUTO_TEST_CASE(pickle_decode_documented_bytes) {
    std::error_code ec;
    auto d = pickle::decode(from_hex("80 04 95 08 00 00 00 00 00 00 00 4b 07 4d ed 1e 86 94 2e"), ec);
    BOOST_REQUIRE(!ec);
    BOOST_TEST((d.kind == pickle::value_kind::request));
    BOOST_TEST(d.request.key.low == 7u);
    BOOST_TEST(d.request.key.high == 0u);
    BOOST_TEST(d.request.pid == 7917);
    d = pickle::decode(from_hex("80 04 95 0a 00 00 00 00 00 00 00 4b 01 4a 40 e2 01 00 86 94 2e"), ec);
    BOOST_REQUIRE(!ec);
    BOOST_TEST(d.request.key.low == 1u);
    BOOST_TEST(d.request.pid == 123456);
    d = pickle::decode(from_hex("80 04 4e 2e"), ec);
    BOOST_REQUIRE(!ec);
    BOOST_TEST((d.kind == pickle::value_kind::none));
    d = pickle::decode(from_hex("80 02 4b 07 4d ed 1e 86 71 00 2e"), ec);  // protocol 2
    BOOST_REQUIRE(!ec);
    BOOST_TEST(d.request.pid == 7917);
}

BOOST_AUTO_TEST_CASE(pickle_round_trip_edge_values) {
    const std::vector<steward::share_key> keys = {{0, 0},
                                                  {0, 255},
                                                  {0, 256},
                                                  {0, 65535},
                                                  {0, 65536},
                                                  {0, 0x7fffffff},
                                                  {0, 0x80000000ULL},
                                                  {0, 0xffffffffULL},
                                                  {0, ~0ULL},
                                                  {1, 0},
                                                  {0x7fffffffffffffffULL, ~0ULL},
                                                  {0x8000000000000000ULL, 0},
                                                  {~0ULL, ~0ULL},
                                                  steward::share_key::generate()};
    const std::vector<std::int64_t> pids = {
        0, 1, 255, 4194304, -1, -129, INT32_MIN, INT32_MAX, std::int64_t{1} << 40, INT64_MIN, INT64_MAX};
    for (int protocol = 2; protocol <= 5; ++protocol) {
        for (const auto& key : keys) {
            for (const auto pid : pids) {
                std::error_code ec;
                const auto d = pickle::decode(pickle::encode_request(key, pid, protocol), ec);
                BOOST_REQUIRE_MESSAGE(
                    !ec, "protocol " << protocol << " key " << key.to_decimal() << " pid " << pid);
                BOOST_TEST((d.kind == pickle::value_kind::request));
                BOOST_TEST((d.request.key == key));
                BOOST_TEST(d.request.pid == pid);
            }
        }
    }
}

BOOST_AUTO_TEST_CASE(pickle_matches_cpython,
                     *boost::unit_test::precondition(steward::test::python3_available)) {
    const std::vector<steward::share_key> keys = {{0, 7},         {0, 300},
                                                  {0, 70000},     {0, 0x80000000ULL},
                                                  {1, 0},         {0x8000000000000000ULL, 1},
                                                  {~0ULL, ~0ULL}, steward::share_key::generate()};
    const std::vector<std::int64_t> pids = {7917, 123456, 1, -5, std::int64_t{1} << 33};
    std::ostringstream script;
    script << "import pickle\n";
    std::vector<std::string> ours;
    for (int protocol = 2; protocol <= 5; ++protocol)
        for (const auto& key : keys)
            for (const auto pid : pids) {
                script << "print(pickle.dumps((" << key.to_decimal() << ", " << pid
                       << "), protocol=" << protocol << ").hex())\n";
                ours.push_back(to_hex(pickle::encode_request(key, pid, protocol)));
            }
    for (int protocol = 2; protocol <= 5; ++protocol) {
        script << "print(pickle.dumps(None, protocol=" << protocol << ").hex())\n";
        ours.push_back(to_hex(pickle::encode_none(protocol)));
    }
    // Default protocol of this python (what Connection.send uses).
    script << "print(pickle.dumps((12345678901234567890, 42)).hex())\n";
    ours.push_back(to_hex(pickle::encode_request(
        steward::share_key::from_decimal("12345678901234567890"), 42,
        steward::test::run_python("import pickle; print(pickle.DEFAULT_PROTOCOL)") == "5" ? 5 : 4)));
    std::istringstream theirs(steward::test::run_python(script.str()));
    std::string line;
    for (const auto& expected : ours) {
        BOOST_REQUIRE(std::getline(theirs, line));
        BOOST_TEST(line == expected);
        std::error_code ec;
        (void)pickle::decode(from_hex(line), ec);  // and CPython's bytes decode
        BOOST_TEST(!ec, "decoding " << line);
    }
}

BOOST_AUTO_TEST_CASE(pickle_refuses_everything_else) {
    const std::vector<std::pair<std::string, std::string>> bad = {
        {"", "empty"},
        {"80", "PROTO without version"},
        {"8001 4e2e", "protocol 1"},
        {"8006 4e2e", "protocol 6"},
        {"4e2e", "no PROTO"},
        {"8004 4e", "no STOP"},
        {"8004 4e2e00", "bytes after STOP"},
        {"8004 2e", "STOP on empty stack"},
        {"8004 4e4e2e", "two values"},
        {"8004 4b01 2e", "a bare int"},
        {"8004 4b014b0186 4b01 2e", "three values"},
        {"8004 4b01 4e 86942e", "(int, None)"},
        {"8004 4e 4b01 86942e", "(None, int)"},
        {"8004 4b014b01 85942e", "TUPLE1"},
        {"8004 4b014b01 87942e", "TUPLE3"},
        {"8004 4b01 4b01 4b01 86942e", "stack overflow"},
        {"8004 4b", "truncated BININT1"},
        {"8004 4d01", "truncated BININT2"},
        {"8004 4a010203", "truncated BININT"},
        {"8004 8a05 0000", "truncated LONG1"},
        {"8004 8a12 000000000000000000000000000000000001 4b01 86942e", "18-byte LONG1"},
        {"8004 8a11 0000000000000000000000000000000001 4b01 86942e", "key of 129 bits"},
        {"8004 8a11 0000000000000000000000000000000080 4b01 86942e", "negative 17th byte"},
        {"8004 8a01ff 4b01 86942e", "negative key -1"},
        {"8004 4a ffffffff 4b01 86942e", "negative key BININT"},
        {"8004 4b01 8a09 000000000000000080 86942e", "pid of 2^63 + ..."},
        {"8004 63 6f730a73797374656d0a 2e", "GLOBAL os.system"},
        {"8004 8c0161 942e", "SHORT_BINUNICODE"},
        {"8004 4b01 4b01 86 68 00 2e", "BINGET"},
        {"8004 4b01 4b01 86 52 2e", "REDUCE"},
        {"8004 94 4e2e", "MEMOIZE on empty stack"},
        {"8002 4b014b0186942e", "MEMOIZE in protocol 2"},
        {"8003 95 0400000000000000 4e2e", "FRAME in protocol 3"},
        {"8004 95 0900000000000000 4b074ded1e86942e", "FRAME longer than data"},
        {"8004 95 0300000000000000 4b074ded1e86942e", "opcode crossing frame end"},
        {"8004 95 0200000000000000 95 0200000000000000 4e2e", "FRAME inside frame"},
        {"8004 95 ffffffffffffffff 4e2e", "FRAME of 2^64-1"},
        {"8004 95 0100000000 4e2e", "truncated FRAME"},
    };
    for (const auto& [hex, what] : bad) {
        std::error_code ec;
        const char* why = nullptr;
        (void)pickle::decode(from_hex(hex), ec, &why);
        BOOST_TEST((ec == steward::errc::malformed_message), what);
        BOOST_TEST(why != nullptr, what);
    }
    // Sanity: the valid neighbours of some of those decode.
    std::error_code ec;
    (void)pickle::decode(from_hex("8004 8a10 ffffffffffffffffffffffffffffff7f 4b01 86942e"), ec);
    BOOST_TEST(!ec);  // 2^127 - 1 in 16 bytes
    (void)pickle::decode(from_hex("8004 95 0200000000000000 4e2e"), ec);
    BOOST_TEST(!ec);
    (void)pickle::decode(from_hex("8004 95 0100000000000000 4e 2e"), ec);
    BOOST_TEST(!ec);  // STOP after the frame, outside any frame: valid pickle
}

BOOST_AUTO_TEST_CASE(pickle_truncations_and_garbage_never_crash) {
    const auto good = pickle::encode_request({~0ULL, 12345}, 999999);
    for (std::size_t n = 0; n < good.size(); ++n) {
        std::error_code ec;
        (void)pickle::decode(std::span(good).first(n), ec);
        BOOST_TEST((ec == steward::errc::malformed_message), "prefix of " << n);
    }
    std::mt19937_64 rng(7);
    int accepted = 0;
    for (int i = 0; i < 20000; ++i) {
        std::vector<std::byte> junk(good.begin(), good.end());
        junk[rng() % junk.size()] = static_cast<std::byte>(rng());
        if (rng() % 3 == 0) junk.resize(rng() % (junk.size() + 1));
        std::error_code ec;
        (void)pickle::decode(junk, ec);
        if (!ec) ++accepted;
    }
    BOOST_TEST(accepted < 20000);  // most mutations are refused; none crash (ASan run)
}

// ---- share_id --------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(share_key_text_forms) {
    const steward::share_key k{0x0123456789abcdefULL, 0xfedcba9876543210ULL};
    BOOST_TEST(k.to_hex() == "0123456789abcdeffedcba9876543210");
    BOOST_TEST((steward::share_key::from_hex("0123456789ABCDEFfedcba9876543210") == k));
    BOOST_TEST(steward::share_key{}.to_decimal() == "0");
    BOOST_TEST((steward::share_key{~0ULL, ~0ULL}.to_decimal() == "340282366920938463463374607431768211455"));
    BOOST_TEST((steward::share_key::from_decimal("340282366920938463463374607431768211455") ==
                steward::share_key{~0ULL, ~0ULL}));
    BOOST_TEST((steward::share_key::from_decimal("18446744073709551616") == steward::share_key{1, 0}));
    BOOST_TEST((steward::share_key::from_decimal("007") == steward::share_key{0, 7}));
    for (const char* bad : {"", "-1", "+1", " 1", "1 ", "1a", "340282366920938463463374607431768211456",
                            "99999999999999999999999999999999999999999"}) {
        std::error_code ec;
        (void)steward::share_key::from_decimal(bad, ec);
        BOOST_TEST((ec == steward::errc::malformed_message), bad);
    }
    BOOST_CHECK_THROW((void)steward::share_key::from_hex("0123"), std::system_error);
    BOOST_CHECK_THROW((void)steward::share_key::from_hex("0123456789abcdeffedcba987654321g"),
                      std::system_error);
    for (int i = 0; i < 100; ++i) {
        const auto r = steward::share_key::generate();
        BOOST_TEST((steward::share_key::from_decimal(r.to_decimal()) == r));
        BOOST_TEST((steward::share_key::from_hex(r.to_hex()) == r));
    }
    BOOST_TEST((steward::share_key::generate() != steward::share_key::generate()));
}

BOOST_AUTO_TEST_CASE(share_key_decimal_matches_python,
                     *boost::unit_test::precondition(steward::test::python3_available)) {
    std::ostringstream script;
    std::vector<steward::share_key> keys;
    for (int i = 0; i < 20; ++i) keys.push_back(steward::share_key::generate());
    for (const auto& k : keys) script << "print(int('" << k.to_hex() << "', 16))\n";
    std::istringstream out(steward::test::run_python(script.str()));
    std::string line;
    for (const auto& k : keys) {
        BOOST_REQUIRE(std::getline(out, line));
        BOOST_TEST(line == k.to_decimal());
    }
}

BOOST_AUTO_TEST_CASE(share_id_format_and_parse) {
    const steward::share_key k{0x0123456789abcdefULL, 0xfedcba9876543210ULL};
    const steward::share_id id("/run/user/1000/steward-Ab1/s", k);
    BOOST_TEST(id.format() == "steward1:0123456789abcdeffedcba9876543210@/run/user/1000/steward-Ab1/s");
    BOOST_TEST((steward::share_id::parse(id.format()) == id));

    // Every byte except NUL survives the round trip, and the text never holds white space or '@'.
    std::string odd = "/tmp/";
    for (int c = 1; c < 256 && odd.size() < 107; ++c)
        if (c != '/') odd.push_back(static_cast<char>(c));
    odd.resize(std::min<std::size_t>(odd.size(), 107));
    const steward::share_id weird(odd, k);
    const std::string text = weird.format();
    BOOST_TEST(text.find_first_of(" \t\n\r\v\f'\"\\$`;|&<>()*?[]{}#!") == std::string::npos);
    BOOST_TEST(text.find('@') == 41u);
    BOOST_TEST(text.rfind('@') == 41u);
    BOOST_TEST((steward::share_id::parse(text) == weird));
    BOOST_TEST(steward::share_id("/a b%@c", k).format() ==
               "steward1:0123456789abcdeffedcba9876543210@/a%20b%25%40c");
    // Lower-case escapes and escaped literals parse too.
    BOOST_TEST(steward::share_id::parse("steward1:0123456789abcdeffedcba9876543210@%2fa%2Fb").address() ==
               "/a/b");
    // The longest path is 107 bytes.
    const std::string longest = "/" + std::string(106, 'x');
    BOOST_TEST(steward::share_id::parse(steward::share_id(longest, k).format()).address() == longest);
}

BOOST_AUTO_TEST_CASE(share_id_rejects_malformed_text) {
    const std::string key = "0123456789abcdeffedcba9876543210";
    const std::vector<std::string> bad = {
        "",
        "steward1:",
        "steward2:" + key + "@/x",
        "Steward1:" + key + "@/x",
        "steward1:" + key.substr(1) + "@/x",
        "steward1:" + key + "0@/x",
        "steward1:" + key + "/x",
        "steward1:" + key + "@",
        "steward1:" + key + "@x/relative",
        "steward1:" + key + "@/a b",
        "steward1:" + key + "@/a\nb",
        "steward1:" + key + "@/a@b",
        "steward1:" + key + "@/a%",
        "steward1:" + key + "@/a%4",
        "steward1:" + key + "@/a%zz",
        "steward1:" + key + "@/a%00b",
        "steward1:0123456789abcdeffedcba987654321g@/x",
        "steward1:" + key + "@/" + std::string(107, 'x'),
        "steward1:" + key + "@/" + std::string(50, 'x') + std::string(20, '%'),
    };
    for (const auto& text : bad) {
        std::error_code ec;
        const auto id = steward::share_id::parse(text, ec);
        BOOST_TEST((ec == steward::errc::malformed_message), text);
        BOOST_TEST(id.empty());
        BOOST_CHECK_THROW((void)steward::share_id::parse(text), std::system_error);
    }
    try {
        (void)steward::share_id::parse("steward1:" + key + "@relative");
        BOOST_FAIL("parse accepted a relative path");
    } catch (const std::system_error& e) {
        BOOST_TEST(std::string(e.what()).find("absolute") != std::string::npos, e.what());
    }
    BOOST_CHECK_THROW(steward::share_id("relative", {}), std::system_error);
    BOOST_CHECK_THROW(steward::share_id("", {}), std::system_error);
    BOOST_CHECK_THROW(steward::share_id("/" + std::string(107, 'x'), {}), std::system_error);
    BOOST_CHECK_THROW(steward::share_id(std::string("/a\0b", 4), {}), std::system_error);
    std::error_code ec;
    (void)steward::share_id::make("/" + std::string(107, 'x'), {}, ec);
    BOOST_TEST((ec == std::errc::filename_too_long));
}

BOOST_AUTO_TEST_CASE(share_id_cpython_ident) {
    const steward::share_id id("/tmp/pymp-abc/listener-xyz", {~0ULL, ~0ULL});
    const auto ident = id.to_cpython();
    BOOST_TEST(ident.address == "/tmp/pymp-abc/listener-xyz");
    BOOST_TEST(ident.key == "340282366920938463463374607431768211455");
    BOOST_TEST((steward::share_id::from_cpython(ident) == id));
    BOOST_TEST((steward::share_id::from_cpython({"/tmp/l", "1"}).key() == steward::share_key{0, 1}));
    std::error_code ec;
    (void)steward::share_id::from_cpython({"/tmp/l", "340282366920938463463374607431768211456"}, ec);
    BOOST_TEST((ec == steward::errc::malformed_message));
    (void)steward::share_id::from_cpython({"/tmp/l", "-3"}, ec);
    BOOST_TEST((ec == steward::errc::malformed_message));
    (void)steward::share_id::from_cpython({"rel", "3"}, ec);
    BOOST_TEST((ec == std::errc::invalid_argument));
}

// ---- native protocol -------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(native_known_bytes) {
    BOOST_TEST(to_hex(native::encode(native::hello{1, 1, 0})) ==
               "01"
               "53545744"
               "0001"
               "0001"
               "00000000");
    BOOST_TEST(to_hex(native::encode(native::hello_ack{1, 64, 65536})) ==
               "02"
               "53545744"
               "0001"
               "00000040"
               "00010000");
    BOOST_TEST(to_hex(native::encode(native::fetch{7, {0x0123456789abcdefULL, 0xfedcba9876543210ULL}})) ==
               "03"
               "0000000000000007"
               "0123456789abcdeffedcba9876543210");
    BOOST_TEST(to_hex(native::encode(native::reply{.request_id = 9,
                                                   .status = native::reply_status::ok,
                                                   .part_fds = 253,
                                                   .total_fds = 1000,
                                                   .part_index = 0,
                                                   .part_count = 4})) ==
               "04"
               "0000000000000009"
               "00"
               "00fd"
               "000003e8"
               "00000000"
               "00000004");
    BOOST_TEST(to_hex(native::encode(native::confirm{5, {7, 9}})) ==
               "05"
               "0000000000000005"
               "00000002"
               "0000000000000007"
               "0000000000000009");
    BOOST_TEST(to_hex(native::encode(native::give_back{3, native::give_back_reason::control_truncated})) ==
               "06"
               "0000000000000003"
               "00");
    BOOST_TEST(to_hex(native::encode(native::error{native::error_code_value::limit_exceeded, "too big"})) ==
               "07"
               "0003"
               "0007"
               "746f6f20626967");
    std::vector<std::byte> framed;
    native::append_frame(framed, native::give_back{3, native::give_back_reason::other});
    BOOST_TEST(to_hex(framed) ==
               "0000000a"
               "06"
               "0000000000000003"
               "01");
    // No native payload can be taken for a pickle.
    for (const native::message& m : {native::message{native::hello{}}, native::message{native::fetch{1, {}}},
                                     native::message{native::error{}}})
        BOOST_TEST((native::encode(m).front() != pickle::proto_opcode));
}

BOOST_AUTO_TEST_CASE(first_frame_classification) {
    using kind = native::first_frame_kind;
    BOOST_TEST((native::classify_first_frame(pickle::encode_request({0, 7}, 1)) == kind::cpython_pickle));
    BOOST_TEST((native::classify_first_frame(pickle::encode_none()) == kind::cpython_pickle));
    BOOST_TEST((native::classify_first_frame(native::encode(native::hello{})) == kind::native_hello));
    BOOST_TEST((native::classify_first_frame(from_hex("01535457")) == kind::unknown));
    BOOST_TEST((native::classify_first_frame(from_hex("0153545745")) == kind::unknown));
    BOOST_TEST((native::classify_first_frame(native::encode(native::fetch{1, {}})) == kind::unknown));
    BOOST_TEST((native::classify_first_frame({}) == kind::unknown));
}

BOOST_AUTO_TEST_CASE(native_round_trip) {
    std::vector<native::message> msgs = {
        native::hello{1, 3, 0},
        native::hello_ack{2, 1000, 65536},
        native::fetch{~0ULL, steward::share_key::generate()},
        native::failure_reply(12, native::reply_status::not_available),
        native::failure_reply(13, native::reply_status::busy),
        native::confirm{0, {}},
        native::confirm{99, std::vector<std::uint64_t>(native::max_confirm_ids, 123)},
        native::give_back{4, native::give_back_reason::other},
        native::error{native::error_code_value::shutting_down, std::string(native::max_error_text, 'e')},
    };
    for (const auto& part : native::split_reply(77, 1000))
        msgs.emplace_back(std::in_place_type<native::reply>, part);
    for (const auto& m : msgs) {
        std::error_code ec;
        const auto payload = native::encode(m);
        BOOST_TEST(payload.size() <= native::max_payload);
        const auto back = native::decode(payload, ec);
        BOOST_REQUIRE_MESSAGE(!ec, "type " << static_cast<int>(payload[0]));
        BOOST_TEST((back == m));
    }
    BOOST_CHECK_THROW(
        (void)native::encode(native::error{native::error_code_value::malformed, std::string(257, 'e')}),
        std::length_error);
    BOOST_CHECK_THROW(
        (void)native::encode(native::confirm{1, std::vector<std::uint64_t>(native::max_confirm_ids + 1, 1)}),
        std::length_error);
}

BOOST_AUTO_TEST_CASE(native_reply_split) {
    BOOST_TEST(native::part_count_for(1) == 1u);
    BOOST_TEST(native::part_count_for(253) == 1u);
    BOOST_TEST(native::part_count_for(254) == 2u);
    BOOST_TEST(native::part_count_for(1000) == 4u);
    const auto parts = native::split_reply(5, 1000);
    BOOST_REQUIRE(parts.size() == 4u);
    std::uint32_t sum = 0;
    for (std::uint32_t i = 0; i < parts.size(); ++i) {
        BOOST_TEST(parts[i].part_index == i);
        BOOST_TEST(parts[i].part_count == 4u);
        BOOST_TEST(parts[i].total_fds == 1000u);
        BOOST_TEST(parts[i].part_fds <= native::max_fds_per_part);
        sum += parts[i].part_fds;
    }
    BOOST_TEST(sum == 1000u);
    BOOST_TEST(parts[3].part_fds == 1000u - 3 * 253);
    BOOST_CHECK_THROW((void)native::split_reply(5, 0), std::invalid_argument);
}

BOOST_AUTO_TEST_CASE(native_rejects_truncation_and_garbage) {
    const std::vector<native::message> msgs = {native::hello{},
                                               native::hello_ack{1, 8, 4096},
                                               native::fetch{1, {1, 2}},
                                               native::split_reply(1, 300)[1],
                                               native::confirm{3, {1, 2}},
                                               native::give_back{1, {}},
                                               native::error{native::error_code_value::malformed, "x"}};
    for (const auto& m : msgs) {
        const auto payload = native::encode(m);
        for (std::size_t n = 0; n < payload.size(); ++n) {
            std::error_code ec;
            (void)native::decode(std::span(payload).first(n), ec);
            BOOST_TEST((ec == steward::errc::malformed_message),
                       "type " << int(payload[0]) << " cut at " << n);
        }
        auto longer = payload;
        longer.push_back(std::byte{0});
        std::error_code ec;
        (void)native::decode(longer, ec);
        BOOST_TEST((ec == steward::errc::malformed_message), "trailing byte, type " << int(payload[0]));
    }
    const std::vector<std::pair<std::string, std::string>> bad = {
        {"00", "type 0"},
        {"08", "type 8"},
        {"80044e2e", "a pickle"},
        {"01 53545745 0001 0001 00000000", "wrong magic"},
        {"01 53545744 0000 0001 00000000", "version 0"},
        {"01 53545744 0002 0001 00000000", "min > max"},
        {"02 53545744 0001 00000000 00010000", "max_in_flight 0"},
        {"03 0000000000000000 0123456789abcdeffedcba9876543210", "request id 0"},
        {"04 0000000000000001 00 00fd 000003e8 00000000 00000003", "wrong part count"},
        {"04 0000000000000001 00 00fc 000003e8 00000000 00000004", "wrong part fds"},
        {"04 0000000000000001 00 00fd 000003e8 00000004 00000004", "index beyond count"},
        {"04 0000000000000001 00 0000 00000000 00000000 00000001", "ok with no fds"},
        {"04 0000000000000001 01 0001 00000001 00000000 00000001", "failure with fds"},
        {"04 0000000000000001 09 0000 00000000 00000000 00000001", "unknown status"},
        {"05 0000000000000001 00000002 0000000000000001", "confirm count too big"},
        {"05 0000000000000001 ffffffff", "confirm count huge"},
        {"05 0000000000000001 00000001 0000000000000000", "confirm id 0"},
        {"06 0000000000000001 02", "unknown give-back reason"},
        {"07 0001 0005 6869", "error text short"},
        {"07 0001 0101" + std::string(2 * 257, 'a'), "error text too long"},
    };
    for (const auto& [hex, what] : bad) {
        std::error_code ec;
        const char* why = nullptr;
        (void)native::decode(from_hex(hex), ec, &why);
        BOOST_TEST((ec == steward::errc::malformed_message), what);
        BOOST_TEST(why != nullptr, what);
    }
    std::vector<std::byte> oversize(native::max_payload + 1, std::byte{5});
    std::error_code ec;
    (void)native::decode(oversize, ec);
    BOOST_TEST((ec == steward::errc::malformed_message));
    std::mt19937_64 rng(11);
    for (int i = 0; i < 20000; ++i) {
        std::vector<std::byte> junk(rng() % 40);
        for (auto& b : junk) b = static_cast<std::byte>(rng() % 9 == 0 ? rng() % 8 : rng());
        (void)native::decode(junk, ec);  // must not crash or read out of bounds (ASan run)
    }
}

// ---- native stream decoding with descriptor batches -------------------------------------------

namespace {

steward::unique_fd open_null() {
    steward::unique_fd fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    BOOST_REQUIRE(fd);
    return fd;
}

// A server's output: frames, and for each frame that carries descriptors, the batch.
struct wire {
    std::vector<std::byte> bytes;
    struct fd_frame {
        std::size_t first = 0, last = 0;  // byte range of the frame
        std::vector<steward::unique_fd> fds;
    };
    std::vector<fd_frame> fd_frames;
    std::vector<int> numbers;  // every descriptor number, in sending order

    void add(const native::message& m) {
        const std::size_t first = bytes.size();
        native::append_frame(bytes, m);
        if (const auto* r = std::get_if<native::reply>(&m); r && r->part_fds > 0) {
            fd_frame f{first, bytes.size(), {}};
            for (int i = 0; i < r->part_fds; ++i) {
                f.fds.push_back(open_null());
                numbers.push_back(f.fds.back().get());
            }
            fd_frames.push_back(std::move(f));
        }
    }
};

// Feeds @p w to @p dec in reads cut by @p rng the way the kernel cuts them (a read never goes
// past the end of a descriptor-carrying sendmsg; the batch arrives with the read holding its
// first byte), collecting every event.
std::vector<native::stream_decoder::event> receive(wire& w, native::stream_decoder& dec, std::mt19937_64& rng,
                                                   std::error_code& ec,
                                                   std::size_t truncate_frame = SIZE_MAX) {
    std::vector<native::stream_decoder::event> events;
    std::size_t pos = 0, next_fd_frame = 0;
    while (pos < w.bytes.size() && !ec) {
        std::size_t len = 1 + rng() % 40;
        len = std::min(len, w.bytes.size() - pos);
        std::vector<steward::unique_fd> batch;
        bool truncated = false;
        if (next_fd_frame < w.fd_frames.size()) {
            auto& f = w.fd_frames[next_fd_frame];
            if (pos + len > f.first) {  // this read reaches the batch's first byte
                len = std::min(len, f.last - pos);
                batch = std::move(f.fds);
                if (next_fd_frame == truncate_frame) {
                    batch.resize(batch.size() / 2);  // MSG_CTRUNC: the rest was dropped (closed)
                    truncated = true;
                }
                ++next_fd_frame;
            }
        }
        auto space = dec.prepare(len);
        std::copy_n(w.bytes.begin() + static_cast<std::ptrdiff_t>(pos), len, space.begin());
        dec.commit(len, std::move(batch), truncated);
        pos += len;
        while (auto ev = dec.next(ec)) events.push_back(std::move(*ev));
    }
    return events;
}

}  // namespace

BOOST_AUTO_TEST_CASE(native_stream_pairs_batches_with_their_parts) {
    const int fds_before = steward::test::open_fd_count();
    std::mt19937_64 rng(3);
    for (int round = 0; round < 200; ++round) {
        wire w;
        w.add(native::hello_ack{1, 64, 65536});
        w.add(native::failure_reply(1, native::reply_status::not_available));
        for (const auto& part : native::split_reply(2, 600)) w.add(part);
        for (const auto& part : native::split_reply(3, 1)) w.add(part);
        w.add(native::error{native::error_code_value::shutting_down, "bye"});
        native::stream_decoder dec;
        native::reply_assembler assembler;
        std::error_code ec;
        auto events = receive(w, dec, rng, ec);
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
        BOOST_REQUIRE(events.size() == 7u);
        BOOST_TEST(dec.buffered() == 0u);
        BOOST_TEST((std::holds_alternative<native::hello_ack>(events[0].msg)));
        BOOST_TEST((std::holds_alternative<native::error>(events[6].msg)));
        std::vector<native::reply_assembler::completed> done;
        for (std::size_t i = 1; i < 6; ++i) {
            auto c = assembler.add(std::get<native::reply>(events[i].msg), std::move(events[i].fds),
                                   events[i].truncated, ec);
            BOOST_REQUIRE(!ec);
            if (c) done.push_back(std::move(*c));
        }
        BOOST_REQUIRE(done.size() == 3u);
        BOOST_TEST((done[0].status == native::reply_status::not_available));
        BOOST_TEST(done[0].fds.empty());
        BOOST_TEST(done[1].request_id == 2u);
        BOOST_REQUIRE(done[1].fds.size() == 600u);
        BOOST_REQUIRE(done[2].fds.size() == 1u);
        bool same = true;
        for (std::size_t i = 0; i < 600; ++i) same = same && done[1].fds[i].get() == w.numbers[i];
        BOOST_TEST(same);  // every descriptor, in the sender's order
        BOOST_TEST(done[2].fds[0].get() == w.numbers[600]);
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(native_stream_truncated_part_gives_nothing) {
    const int fds_before = steward::test::open_fd_count();
    std::mt19937_64 rng(5);
    {
        wire w;
        for (const auto& part : native::split_reply(9, 600)) w.add(part);
        for (const auto& part : native::split_reply(10, 2)) w.add(part);
        native::stream_decoder dec;
        dec.set_version(1);  // one part per sendmsg, as wire + receive() send it
        std::error_code ec;
        auto events = receive(w, dec, rng, ec, 1);  // the second part of request 9 is cut
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
        BOOST_REQUIRE(events.size() == 4u);
        BOOST_TEST(events[1].truncated);
        native::reply_assembler assembler;
        std::vector<native::reply_assembler::completed> done;
        for (auto& ev : events) {
            auto c = assembler.add(std::get<native::reply>(ev.msg), std::move(ev.fds), ev.truncated, ec);
            BOOST_REQUIRE(!ec);
            if (c) done.push_back(std::move(*c));
        }
        BOOST_REQUIRE(done.size() == 2u);
        BOOST_TEST(done[0].request_id == 9u);
        BOOST_TEST((done[0].error == steward::errc::control_truncated));
        BOOST_TEST(done[0].fds.empty());  // all-or-nothing: the parts that did arrive are closed
        BOOST_TEST(!done[1].error);
        BOOST_TEST(done[1].fds.size() == 2u);  // the connection goes on
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(native_stream_protocol_errors) {
    const int fds_before = steward::test::open_fd_count();
    auto run = [](std::vector<std::byte> bytes, std::size_t batch_at, std::size_t batch_size) {
        native::stream_decoder dec;
        std::error_code ec;
        std::vector<steward::unique_fd> batch;
        for (std::size_t i = 0; i < batch_size; ++i) batch.push_back(open_null());
        // Two reads: [0, batch_at) and [batch_at, end); the batch rides on the second.
        for (int read = 0; read < 2 && !ec; ++read) {
            const std::size_t from = read == 0 ? 0 : batch_at, to = read == 0 ? batch_at : bytes.size();
            auto space = dec.prepare(to - from);
            std::copy(bytes.begin() + static_cast<std::ptrdiff_t>(from),
                      bytes.begin() + static_cast<std::ptrdiff_t>(to), space.begin());
            dec.commit(to - from, read == 1 ? std::move(batch) : std::vector<steward::unique_fd>{});
            while (dec.next(ec)) {
            }
        }
        return ec;
    };
    std::vector<std::byte> two_parts;
    for (const auto& p : native::split_reply(1, 300)) native::append_frame(two_parts, p);
    const std::size_t part_size = two_parts.size() / 2;

    // Descriptors that no frame claims stay in the FIFO until the next batch boundary
    // (native_fifo_protocol_errors covers that).
    // A part that declares descriptors that never came (first part in a read without a batch).
    BOOST_TEST((run(two_parts, part_size, 47) == steward::errc::malformed_message));
    // Fewer descriptors than declared (more: caught at the next batch, native_fifo_protocol_errors).
    {
        std::vector<std::byte> one;
        native::append_frame(one, native::split_reply(1, 2)[0]);
        BOOST_TEST((run(one, 0, 1) == steward::errc::malformed_message));  // fewer, not truncated
        BOOST_TEST(!run(one, 0, 2));
    }
    // A frame above the limit and garbage inside a frame.
    BOOST_TEST((run(from_hex("00010001"), 4, 0) == steward::errc::limit_exceeded));
    BOOST_TEST((run(from_hex("00000001 09"), 5, 0) == steward::errc::malformed_message));

    // Assembler: interleaving and out-of-order parts.
    native::reply_assembler assembler;
    std::error_code ec;
    const auto parts = native::split_reply(4, 600);
    BOOST_TEST(!assembler.add(parts[1], {}, false, ec));
    BOOST_TEST((ec == steward::errc::malformed_message));  // does not start at part 0
    std::vector<steward::unique_fd> batch;
    for (int i = 0; i < 253; ++i) batch.push_back(open_null());
    BOOST_TEST(!assembler.add(parts[0], std::move(batch), false, ec));
    BOOST_TEST(!ec);
    BOOST_TEST(assembler.in_progress());
    BOOST_TEST(!assembler.add(native::split_reply(5, 1)[0], {}, false, ec));
    BOOST_TEST((ec == steward::errc::malformed_message));  // another request in the middle
    BOOST_TEST(!assembler.in_progress());
    BOOST_TEST(steward::test::open_fd_count() == fds_before);  // the 253 were closed
}

BOOST_AUTO_TEST_CASE(assembler_refuses_parts_that_change_what_part_zero_announced) {
    // Found by the native_frame fuzzer: each part is valid alone, but part 1 claims a larger total
    // (or more parts, or another status) than part 0 did.
    const int fds_before = steward::test::open_fd_count();
    auto batch_of = [](std::size_t n) {
        std::vector<steward::unique_fd> fds;
        for (std::size_t i = 0; i < n; ++i) fds.push_back(open_null());
        return fds;
    };
    auto feed_two = [&](native::reply second) {
        native::reply_assembler assembler;
        std::error_code ec;
        const auto first = native::split_reply(1, 256)[0];
        BOOST_TEST(!assembler.add(first, batch_of(first.part_fds), false, ec));
        BOOST_TEST(!ec);
        auto done = assembler.add(second, batch_of(second.part_fds), false, ec);
        BOOST_TEST(!done.has_value());
        BOOST_TEST(!assembler.in_progress());
        return ec;
    };
    auto grown = native::split_reply(1, 300)[1];  // {index 1 of 2, 47 fds, total 300}
    BOOST_TEST((feed_two(grown) == steward::errc::malformed_message));
    auto more_parts = native::split_reply(1, 256)[1];
    more_parts.part_count = 3;
    BOOST_TEST((feed_two(more_parts) == steward::errc::malformed_message));
    auto other_status = native::split_reply(1, 256)[1];
    other_status.status = native::reply_status::not_available;
    BOOST_TEST((feed_two(other_status) == steward::errc::malformed_message));
    BOOST_TEST(steward::test::open_fd_count() == fds_before);

    // The honest sequence still assembles all 256.
    native::reply_assembler assembler;
    std::error_code ec;
    const auto parts = native::split_reply(1, 256);
    BOOST_TEST(!assembler.add(parts[0], batch_of(parts[0].part_fds), false, ec));
    auto done = assembler.add(parts[1], batch_of(parts[1].part_fds), false, ec);
    BOOST_REQUIRE(done.has_value());
    BOOST_TEST(!ec);
    BOOST_TEST(done->fds.size() == 256u);
}

// ---- version 2: QUICK / QUICK_ACK --------------------------------------------------------------

namespace {

steward::authkey counting_key() {
    steward::authkey k;
    for (std::size_t i = 0; i < k.bytes.size(); ++i) k.bytes[i] = static_cast<std::byte>(i);
    return k;
}

native::quick_nonce counting_nonce() {
    native::quick_nonce n{};
    for (std::size_t i = 0; i < n.size(); ++i) n[i] = static_cast<std::byte>(0x40 + i);
    return n;
}

native::quick sample_quick(bool with_fetch) {
    native::quick q;
    q.client_nonce = counting_nonce();
    if (with_fetch) q.first_fetch = native::fetch{7, {0x0123456789abcdefULL, 0xfedcba9876543210ULL}};
    return q;
}

// Replaces the MAC of a QUICK payload by the right one for its (possibly edited) bytes, so a
// test can break the structure without also breaking the MAC.
void remac_quick(std::vector<std::byte>& payload, const native::quick_mac_key& key) {
    if (payload.size() < native::quick_mac_size) return;
    const auto signed_size = payload.size() - native::quick_mac_size;
    const auto mac = native::quick_mac(key, std::span<const std::byte>(payload).first(signed_size));
    std::copy(mac.begin(), mac.end(), payload.begin() + static_cast<std::ptrdiff_t>(signed_size));
}

void remac_ack(std::vector<std::byte>& payload, const native::quick_mac_key& key) {
    const auto signed_size = payload.size() - native::quick_mac_size;
    const auto mac =
        native::quick_ack_mac(key, counting_nonce(), std::span<const std::byte>(payload).first(signed_size));
    std::copy(mac.begin(), mac.end(), payload.begin() + static_cast<std::ptrdiff_t>(signed_size));
}

}  // namespace

BOOST_AUTO_TEST_CASE(quick_known_answer) {
    // Expected bytes computed independently when this test was written, with python3:
    //   key = bytes(range(32)); nonce = bytes(range(0x40, 0x60))
    //   p = b'\x08STWD' + struct.pack('>HHI', 2, 2, 0) + nonce + b'\x01' + struct.pack('>Q', 7)
    //       + bytes.fromhex('0123456789abcdeffedcba9876543210')
    //   p + hmac.new(key, b'steward quick v2 client' + p, hashlib.sha256).digest()
    // (has_fetch 0: the same without the FETCH), and for QUICK_ACK
    //   p = b'\x09STWD' + struct.pack('>HII', 2, 64, 65536)
    //   p + hmac.new(key, b'steward quick v2 server' + nonce + p, hashlib.sha256).digest()
    const steward::authkey key = counting_key();
    const native::quick_mac_key prepared(key);
    const std::string with_fetch =
        "08"
        "53545744"
        "0002"
        "0002"
        "00000000"
        "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
        "01"
        "0000000000000007"
        "0123456789abcdeffedcba9876543210"
        "89744f55155e2107c6aca1c9403a2123d0d6bbaa257558815553d4bb41d6e0da";
    const std::string without_fetch =
        "08"
        "53545744"
        "0002"
        "0002"
        "00000000"
        "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
        "00"
        "f1998d1c5b2e4368ca055160f67be1b607a461e69876a640715838c1c07a262f";
    const std::string ack =
        "09"
        "53545744"
        "0002"
        "00000040"
        "00010000"
        "786a5511ac754a003b82ada4ba932c8acca971a1f74355a35ad3c0ae5ef02e68";
    BOOST_TEST(to_hex(native::encode_quick(prepared, sample_quick(true))) == with_fetch);
    BOOST_TEST(to_hex(native::encode_quick(key, sample_quick(true))) == with_fetch);
    BOOST_TEST(to_hex(native::encode_quick(prepared, sample_quick(false))) == without_fetch);
    BOOST_TEST(
        to_hex(native::encode_quick_ack(prepared, counting_nonce(), native::hello_ack{2, 64, 65536})) == ack);
    BOOST_TEST(to_hex(native::encode_quick_ack(key, counting_nonce(), native::hello_ack{2, 64, 65536})) ==
               ack);
    BOOST_TEST(native::quick_size_with_fetch == with_fetch.size() / 2);
    BOOST_TEST(native::quick_size_without_fetch == without_fetch.size() / 2);
    BOOST_TEST(native::quick_ack_size == ack.size() / 2);

    // Framed forms: the 4-byte header, then the same payload.
    std::vector<std::byte> framed;
    native::append_quick_frame(framed, prepared, sample_quick(false));
    BOOST_TEST(to_hex(framed) == "0000004e" + without_fetch);
    framed.clear();
    native::append_quick_ack_frame(framed, key, counting_nonce(), native::hello_ack{2, 64, 65536});
    BOOST_TEST(to_hex(framed) == "0000002f" + ack);

    std::error_code ec;
    const native::quick q = native::decode_quick(prepared, from_hex(with_fetch), ec);
    BOOST_TEST(!ec);
    BOOST_TEST((q == sample_quick(true)));
    const native::hello_ack a = native::decode_quick_ack(key, counting_nonce(), from_hex(ack), ec);
    BOOST_TEST(!ec);
    BOOST_TEST((a == native::hello_ack{2, 64, 65536}));
}

BOOST_AUTO_TEST_CASE(quick_round_trip_and_classification) {
    const steward::authkey key = steward::authkey::generate();
    native::quick_mac_key prepared(key);
    std::mt19937_64 rng(21);
    for (int i = 0; i < 200; ++i) {
        native::quick q;
        q.min_version = static_cast<std::uint16_t>(1 + rng() % 2);
        q.max_version = static_cast<std::uint16_t>(2 + rng() % 5);
        q.flags = static_cast<std::uint32_t>(rng());
        for (auto& b : q.client_nonce) b = static_cast<std::byte>(rng());
        if (rng() % 2) q.first_fetch = native::fetch{1 + rng() % 1000, steward::share_key::generate()};
        const auto payload = native::encode_quick(prepared, q);
        std::error_code ec;
        BOOST_TEST((native::decode_quick(key, payload, ec) == q));
        BOOST_TEST(!ec);
        BOOST_TEST((native::classify_first_frame(payload) == native::first_frame_kind::native_quick));
        const native::hello_ack ack{static_cast<std::uint16_t>(2 + rng() % 3),
                                    1 + static_cast<std::uint32_t>(rng() % 99),
                                    static_cast<std::uint32_t>(rng())};
        const auto ack_payload = native::encode_quick_ack(prepared, q.client_nonce, ack);
        BOOST_TEST((native::decode_quick_ack(prepared, q.client_nonce, ack_payload, ec) == ack));
        BOOST_TEST(!ec);
        BOOST_TEST((native::classify_first_frame(ack_payload) == native::first_frame_kind::unknown));
    }
    // The generic decoder refuses both: they are only valid as the first frame of a direction.
    std::error_code ec;
    const char* why = nullptr;
    (void)native::decode(native::encode_quick(prepared, sample_quick(true)), ec, &why);
    BOOST_TEST((ec == steward::errc::malformed_message));
    BOOST_TEST(why != nullptr);
    (void)native::decode(native::encode_quick_ack(prepared, counting_nonce(), {2, 1, 1}), ec);
    BOOST_TEST((ec == steward::errc::malformed_message));
    // ERROR code 7.
    const native::error auth_error{native::error_code_value::authentication_failed, "bad MAC"};
    BOOST_TEST(to_hex(native::encode(auth_error)).substr(0, 6) == "070007");
    BOOST_TEST((native::decode(native::encode(auth_error), ec) == native::message{auth_error}));
    BOOST_TEST(!ec);
    // What the encoders refuse to write.
    native::quick old = sample_quick(false);
    old.max_version = 1;
    old.min_version = 1;
    BOOST_CHECK_THROW((void)native::encode_quick(prepared, old), std::invalid_argument);
    native::quick zero_id = sample_quick(true);
    zero_id.first_fetch->request_id = 0;
    BOOST_CHECK_THROW((void)native::encode_quick(prepared, zero_id), std::invalid_argument);
    std::vector<std::byte> out{std::byte{1}};
    BOOST_CHECK_THROW(native::append_quick_frame(out, prepared, zero_id), std::invalid_argument);
    BOOST_TEST(out.size() == 1u);  // nothing half-written
    BOOST_CHECK_THROW((void)native::encode_quick_ack(prepared, counting_nonce(), {1, 1, 1}),
                      std::invalid_argument);
    BOOST_CHECK_THROW((void)native::encode_quick_ack(prepared, counting_nonce(), {2, 0, 1}),
                      std::invalid_argument);
}

BOOST_AUTO_TEST_CASE(quick_malformed_and_bad_mac) {
    const steward::authkey key = counting_key();
    const native::quick_mac_key prepared(key);
    const auto good = native::encode_quick(prepared, sample_quick(true));
    const auto good_short = native::encode_quick(prepared, sample_quick(false));
    auto expect = [&](std::vector<std::byte> payload, steward::errc want, const std::string& what) {
        std::error_code ec;
        const char* why = nullptr;
        const native::quick q = native::decode_quick(prepared, payload, ec, &why);
        BOOST_TEST((ec == want), what << ": " << ec.message());
        BOOST_TEST(why != nullptr, what);
        BOOST_TEST((q == native::quick{}), what);
    };
    using steward::errc;
    auto edited = [&](std::vector<std::byte> p, std::size_t at, std::uint8_t v, bool remac = true) {
        p[at] = std::byte{v};
        if (remac) remac_quick(p, prepared);
        return p;
    };
    expect(edited(good, 0, 0x01), errc::malformed_message, "HELLO type");
    expect(edited(good, 0, 0x09), errc::malformed_message, "QUICK_ACK type");
    expect(edited(good, 1, 'X'), errc::malformed_message, "magic");
    expect(edited(good, 4, 'd'), errc::malformed_message, "magic case");
    for (std::size_t size :
         {std::size_t{0}, std::size_t{1}, std::size_t{5}, native::quick_size_without_fetch - 1,
          native::quick_size_without_fetch + 1, native::quick_size_with_fetch - 1,
          native::quick_size_with_fetch + 1, std::size_t{300}}) {
        std::vector<std::byte> p = good;
        p.resize(size, std::byte{0});
        remac_quick(p, prepared);
        expect(p, errc::malformed_message, "size " + std::to_string(size));
    }
    const std::size_t has_fetch_at = 1 + 4 + 2 + 2 + 4 + 32;
    expect(edited(good, has_fetch_at, 2), errc::malformed_message, "has_fetch 2");
    expect(edited(good, has_fetch_at, 0xff), errc::malformed_message, "has_fetch ff");
    expect(edited(good, has_fetch_at, 0), errc::malformed_message, "has_fetch 0 with a FETCH");
    expect(edited(good_short, has_fetch_at, 1), errc::malformed_message, "has_fetch 1 without a FETCH");
    // Version ranges: min 0, min > max, max below 2.
    expect(edited(good, 6, 0), errc::malformed_message, "min_version 0");
    expect(edited(good, 6, 3), errc::malformed_message, "min_version above max_version");
    {
        auto p = edited(good, 8, 1, false);
        p[6] = std::byte{1};
        remac_quick(p, prepared);
        expect(p, errc::malformed_message, "max_version 1");
    }
    // request id 0 in the embedded FETCH.
    {
        auto p = good;
        std::fill_n(p.begin() + has_fetch_at + 1, 8, std::byte{0});
        remac_quick(p, prepared);
        expect(p, errc::malformed_message, "request id 0");
    }
    // A larger version range and any flags are fine (reserved, covered by the MAC).
    {
        auto p = edited(good, 8, 9, false);
        p[12] = std::byte{0x80};
        remac_quick(p, prepared);
        std::error_code ec;
        const auto q = native::decode_quick(prepared, p, ec);
        BOOST_TEST(!ec);
        BOOST_TEST(q.max_version == 9u);
        BOOST_TEST(q.flags == 0x80u);
    }
    // Every single flipped bit that keeps the structure valid breaks the MAC.
    for (std::size_t i = 0; i < good.size(); ++i) {
        for (int bit = 0; bit < 8; ++bit) {
            auto p = good;
            p[i] ^= static_cast<std::byte>(1 << bit);
            std::error_code ec;
            (void)native::decode_quick(prepared, p, ec);
            BOOST_TEST((ec == errc::malformed_message || ec == errc::authentication_failed), "byte " << i);
            const bool structural = i < 9 || (i >= 5 && i < 9) || i == has_fetch_at;
            if (!structural) BOOST_TEST((ec == errc::authentication_failed), "byte " << i << " bit " << bit);
        }
    }
    // Another key, or a server MAC passed off as a client MAC.
    {
        std::error_code ec;
        (void)native::decode_quick(steward::authkey::generate(), good, ec);
        BOOST_TEST((ec == errc::authentication_failed));
        auto p = good_short;
        const auto signed_size = p.size() - native::quick_mac_size;
        const auto mac = native::quick_ack_mac(prepared, counting_nonce(),
                                               std::span<const std::byte>(p).first(signed_size));
        std::copy(mac.begin(), mac.end(), p.begin() + static_cast<std::ptrdiff_t>(signed_size));
        expect(p, errc::authentication_failed, "server context");
    }
    // Garbage never crashes.
    std::mt19937_64 rng(23);
    for (int i = 0; i < 5000; ++i) {
        auto p = rng() % 2 ? good : good_short;
        p.resize(rng() % 2 ? p.size() : rng() % 120);
        for (int n = static_cast<int>(rng() % 4); n > 0 && !p.empty(); --n)
            p[rng() % p.size()] = static_cast<std::byte>(rng());
        std::error_code ec;
        (void)native::decode_quick(prepared, p, ec);
        BOOST_TEST((ec == errc::malformed_message || ec == errc::authentication_failed || !ec));
    }
}

BOOST_AUTO_TEST_CASE(quick_ack_malformed_and_bad_mac) {
    const steward::authkey key = counting_key();
    const native::quick_mac_key prepared(key);
    const auto good = native::encode_quick_ack(prepared, counting_nonce(), {2, 64, 65536});
    auto decode_with = [&](const std::vector<std::byte>& p, const native::quick_nonce& nonce) {
        std::error_code ec;
        const char* why = nullptr;
        const auto ack = native::decode_quick_ack(prepared, nonce, p, ec, &why);
        BOOST_TEST((ec ? why != nullptr : true));
        BOOST_TEST((ec ? ack == native::hello_ack{} : true));
        return ec;
    };
    using steward::errc;
    BOOST_TEST(!decode_with(good, counting_nonce()));
    auto edited = [&](std::size_t at, std::uint8_t v) {
        auto p = good;
        p[at] = std::byte{v};
        remac_ack(p, prepared);
        return p;
    };
    BOOST_TEST((decode_with(edited(0, 0x08), counting_nonce()) == errc::malformed_message));
    BOOST_TEST((decode_with(edited(2, 'x'), counting_nonce()) == errc::malformed_message));
    BOOST_TEST((decode_with(edited(6, 1), counting_nonce()) == errc::malformed_message));  // version 1
    {
        auto p = good;
        std::fill_n(p.begin() + 7, 4, std::byte{0});  // max_in_flight 0
        remac_ack(p, prepared);
        BOOST_TEST((decode_with(p, counting_nonce()) == errc::malformed_message));
    }
    for (std::size_t size :
         {std::size_t{0}, std::size_t{5}, native::quick_ack_size - 1, native::quick_ack_size + 1}) {
        auto p = good;
        p.resize(size, std::byte{0});
        BOOST_TEST((decode_with(p, counting_nonce()) == errc::malformed_message), "size " << size);
    }
    // The MAC binds the client's nonce: an answer to another connection's QUICK does not verify.
    native::quick_nonce other = counting_nonce();
    other[31] ^= std::byte{1};
    BOOST_TEST((decode_with(good, other) == errc::authentication_failed));
    for (std::size_t i = 5; i < good.size(); ++i) {
        auto p = good;
        p[i] ^= std::byte{0x10};
        const auto ec = decode_with(p, counting_nonce());
        // Bytes 5..6 are the version (0x12 is still >= 2), 7..10 max_in_flight: all under the MAC.
        BOOST_TEST((ec == errc::authentication_failed), "byte " << i);
    }
    // A client MAC (other context string, no nonce) is no server MAC.
    {
        auto p = good;
        const auto signed_size = p.size() - native::quick_mac_size;
        const auto mac = native::quick_mac(prepared, std::span<const std::byte>(p).first(signed_size));
        std::copy(mac.begin(), mac.end(), p.begin() + static_cast<std::ptrdiff_t>(signed_size));
        BOOST_TEST((decode_with(p, counting_nonce()) == errc::authentication_failed));
    }
    std::error_code ec;
    (void)native::decode_quick_ack(steward::authkey::generate(), counting_nonce(), good, ec);
    BOOST_TEST((ec == errc::authentication_failed));
}

BOOST_AUTO_TEST_CASE(quick_mac_key_lifetime_and_cache) {
    const steward::authkey a = counting_key();
    const steward::authkey b = steward::authkey::generate();
    native::quick_mac_key ka(a);
    BOOST_TEST(ka.is_for(a));
    BOOST_TEST(!ka.is_for(b));
    const auto expected = native::encode_quick(ka, sample_quick(true));
    native::quick_mac_key moved(std::move(ka));
    BOOST_TEST(moved.is_for(a));
    BOOST_TEST(!ka.is_for(a));  // NOLINT(bugprone-use-after-move): a moved-from key verifies nothing
    BOOST_TEST(to_hex(native::encode_quick(moved, sample_quick(true))) == to_hex(expected));
    std::error_code ec;
    (void)native::decode_quick(ka, expected, ec);  // NOLINT(bugprone-use-after-move)
    BOOST_TEST((ec == steward::errc::authentication_failed));
    native::quick_mac_key kb(b);
    kb = std::move(moved);
    BOOST_TEST(kb.is_for(a));
    // The per-thread cache behind the authkey overloads follows the key it is given.
    for (int i = 0; i < 4; ++i) {
        const auto with_a = native::encode_quick(a, sample_quick(true));
        const auto with_b = native::encode_quick(b, sample_quick(true));
        BOOST_TEST(to_hex(with_a) == to_hex(expected));
        BOOST_TEST(to_hex(with_a) != to_hex(with_b));
        (void)native::decode_quick(b, with_b, ec);
        BOOST_TEST(!ec);
        (void)native::decode_quick(a, with_b, ec);
        BOOST_TEST((ec == steward::errc::authentication_failed));
    }
}

// ---- version 2: frame_packer -------------------------------------------------------------------

namespace {

std::vector<int> fake_fds(std::size_t n, int base) {
    std::vector<int> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = base + static_cast<int>(i);
    return v;
}

// Decodes every frame of @p bytes (they must be whole frames).
std::vector<std::vector<std::byte>> payloads_of(std::span<const std::byte> bytes) {
    std::vector<std::vector<std::byte>> out;
    while (!bytes.empty()) {
        const auto probe = framing::probe_frame(bytes, native::max_payload);
        BOOST_REQUIRE((probe.status == framing::frame_status::frame));
        const auto payload = bytes.subspan(probe.header_size, static_cast<std::size_t>(probe.payload_size));
        out.emplace_back(payload.begin(), payload.end());
        bytes = bytes.subspan(static_cast<std::size_t>(probe.total_size()));
    }
    return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(frame_packer_fewest_chunks) {
    const native::quick_mac_key key(counting_key());
    native::frame_packer packer;  // version 2
    packer.append_quick_ack(key, counting_nonce(), {2, 64, 65536});
    std::vector<int> expected_fds;
    // 300 single-descriptor replies: 253 fit the first sendmsg, 47 the second.
    for (std::uint64_t id = 1; id <= 300; ++id) {
        const auto fd = fake_fds(1, static_cast<int>(1000 + id));
        packer.append_reply(native::split_reply(id, 1)[0], fd);
        expected_fds.push_back(fd[0]);
        if (id % 100 == 0)
            packer.append(native::failure_reply(1000 + id, native::reply_status::not_available));
    }
    BOOST_REQUIRE(packer.chunk_count() == 2u);
    const auto chunks = packer.chunks();
    BOOST_TEST(chunks[0].fds.size() == 253u);
    BOOST_TEST(chunks[1].fds.size() == 47u);
    BOOST_TEST(chunks[0].bytes.size() + chunks[1].bytes.size() == packer.bytes().size());
    BOOST_TEST(chunks[0].bytes.data() == packer.bytes().data());
    BOOST_TEST(chunks[1].bytes.data() == packer.bytes().data() + chunks[0].bytes.size());
    BOOST_TEST((std::vector<int>(packer.fds().begin(), packer.fds().end()) == expected_fds));
    // Each chunk is whole frames, and its descriptors are exactly what its REPLY parts declare.
    std::size_t frames = 0;
    for (const auto& c : chunks) {
        std::size_t declared = 0;
        for (const auto& p : payloads_of(c.bytes)) {
            ++frames;
            std::error_code ec;
            const auto m = native::decode(p, ec);
            if (p[0] == std::byte{0x09}) continue;  // QUICK_ACK (checked below)
            BOOST_REQUIRE(!ec);
            if (const auto* r = std::get_if<native::reply>(&m)) declared += r->part_fds;
        }
        BOOST_TEST(declared == c.fds.size());
    }
    BOOST_TEST(frames == 1u + 300u + 3u);
    std::error_code ec;
    const auto first = payloads_of(chunks[0].bytes).front();
    BOOST_TEST(
        (native::decode_quick_ack(key, counting_nonce(), first, ec) == native::hello_ack{2, 64, 65536}));

    // A 600-descriptor reply behind a 200-descriptor one: 200 | 253 | 147+... (greedy, in order).
    packer.clear();
    BOOST_TEST(packer.empty());
    BOOST_TEST(packer.chunk_count() == 0u);
    packer.append_reply(native::split_reply(1, 200)[0], fake_fds(200, 10));
    for (const auto& part : native::split_reply(2, 600))
        packer.append_reply(part, fake_fds(part.part_fds, 300));
    packer.append_reply(native::split_reply(3, 100)[0], fake_fds(100, 2000));
    std::vector<std::size_t> counts;
    for (const auto& c : packer.chunks()) counts.push_back(c.fds.size());
    BOOST_TEST((counts == std::vector<std::size_t>{200, 253, 253, 94 + 100}));

    // Version 1: one REPLY with descriptors per sendmsg, the frames without between them grouped.
    native::frame_packer v1(1);
    v1.append(native::hello_ack{1, 8, 4096});
    v1.append(native::failure_reply(1, native::reply_status::busy));
    v1.append_reply(native::split_reply(2, 3)[0], fake_fds(3, 50));
    v1.append_reply(native::split_reply(3, 2)[0], fake_fds(2, 60));
    v1.append(native::failure_reply(4, native::reply_status::busy));
    v1.append(native::failure_reply(5, native::reply_status::busy));
    counts.clear();
    std::vector<std::size_t> frame_counts;
    for (const auto& c : v1.chunks()) {
        counts.push_back(c.fds.size());
        frame_counts.push_back(payloads_of(c.bytes).size());
    }
    BOOST_TEST((counts == std::vector<std::size_t>{0, 3, 2, 0}));
    BOOST_TEST((frame_counts == std::vector<std::size_t>{2, 1, 1, 2}));
}

BOOST_AUTO_TEST_CASE(frame_packer_refuses_descriptors_that_do_not_match) {
    native::frame_packer packer;
    const auto part = native::split_reply(1, 3)[0];
    BOOST_CHECK_THROW(packer.append_reply(part, fake_fds(2, 5)), std::invalid_argument);
    BOOST_CHECK_THROW(packer.append(part), std::invalid_argument);
    BOOST_TEST(packer.empty());
    std::vector<std::byte> frame;
    native::append_frame(frame, part);
    BOOST_CHECK_THROW(packer.append_framed(frame, fake_fds(4, 5)), std::invalid_argument);
    std::vector<std::byte> hello;
    native::append_frame(hello, native::hello_ack{});
    BOOST_CHECK_THROW(packer.append_framed(hello, fake_fds(1, 5)), std::invalid_argument);
    BOOST_CHECK_THROW(packer.append_framed(std::span<const std::byte>(frame).first(10)),
                      std::invalid_argument);
    auto two = frame;
    two.insert(two.end(), hello.begin(), hello.end());
    BOOST_CHECK_THROW(packer.append_framed(two), std::invalid_argument);
    BOOST_TEST(packer.empty());
    packer.append_framed(frame, fake_fds(3, 5));
    packer.append_framed(hello);
    BOOST_TEST(packer.chunk_count() == 1u);

    // pack_frames is the same as appending one by one.
    const std::vector<int> fds = fake_fds(3, 5);
    const native::outgoing_frame list[] = {{frame, fds}, {hello, {}}};
    const native::packed_frames packed = native::pack_frames(list);
    BOOST_TEST(to_hex(packed.bytes) ==
               to_hex(std::vector<std::byte>(packer.bytes().begin(), packer.bytes().end())));
    BOOST_TEST((packed.fds == fds));
    BOOST_REQUIRE(packed.chunks.size() == 1u);
    BOOST_TEST(packed.chunks[0].byte_count == packed.bytes.size());
    BOOST_TEST(packed.chunks[0].fd_count == 3u);
}

// ---- version 2: FIFO attribution of descriptor batches -----------------------------------------

namespace {

// A server's output as sendmsg calls (a frame_packer's chunks) with real descriptors.
struct sent_stream {
    std::vector<std::byte> bytes;
    struct call {
        std::size_t first = 0, last = 0;  // byte range
        std::vector<steward::unique_fd> fds;
        std::size_t truncate_to = SIZE_MAX;  // MSG_CTRUNC at the receiver: only a prefix arrives
    };
    std::vector<call> calls;
    std::map<std::uint64_t, std::vector<int>> numbers;  // request id -> descriptor numbers sent

    // @p replies: (request id, descriptor count; 0 = not_available), packed for @p version.
    sent_stream(const std::vector<std::pair<std::uint64_t, std::uint32_t>>& replies, std::uint16_t version,
                std::vector<int> extra_in_call = {}) {
        native::frame_packer packer(version);
        std::vector<steward::unique_fd> owned;
        packer.append(native::hello_ack{version, 64, 65536});
        for (const auto& [id, n] : replies) {
            if (n == 0) {
                packer.append(native::failure_reply(id, native::reply_status::not_available));
                continue;
            }
            for (const auto& part : native::split_reply(id, n)) {
                std::vector<int> nums;
                for (int i = 0; i < part.part_fds; ++i) {
                    owned.push_back(open_null());
                    nums.push_back(owned.back().get());
                }
                numbers[id].insert(numbers[id].end(), nums.begin(), nums.end());
                packer.append_reply(part, nums);
            }
        }
        bytes.assign(packer.bytes().begin(), packer.bytes().end());
        std::size_t fd_at = 0;
        for (std::size_t i = 0; i < packer.chunk_count(); ++i) {
            const auto c = packer.chunk_at(i);
            call k;
            k.first = static_cast<std::size_t>(c.bytes.data() - packer.bytes().data());
            k.last = k.first + c.bytes.size();
            for (std::size_t j = 0; j < c.fds.size(); ++j) k.fds.push_back(std::move(owned[fd_at++]));
            calls.push_back(std::move(k));
        }
        // A misbehaving server: surplus descriptors on some calls.
        for (std::size_t i = 0; i < extra_in_call.size() && i < calls.size(); ++i)
            for (int n = 0; n < extra_in_call[i]; ++n) calls[i].fds.push_back(open_null());
    }
};

struct receive_options {
    std::size_t max_read = 64;    // each read asks for 1..max_read bytes
    bool fixed = false;           // each read asks for exactly max_read bytes
    bool drain_each_read = true;  // else next() runs only after every read was committed
};

// Feeds @p s to @p dec the way Linux would: a read stops at the end of the sendmsg whose batch it
// took (one socket buffer per sendmsg) and never takes two batches; short reads are real short
// reads (commit < prepare).
std::vector<native::stream_decoder::event> receive_calls(sent_stream& s, native::stream_decoder& dec,
                                                         std::mt19937_64& rng, std::error_code& ec,
                                                         receive_options opt = {}) {
    std::vector<native::stream_decoder::event> events;
    std::size_t pos = 0, call = 0;
    auto drain = [&] {
        while (auto ev = dec.next(ec)) events.push_back(std::move(*ev));
    };
    while (pos < s.bytes.size() && !ec) {
        const std::size_t asked = opt.fixed ? opt.max_read : 1 + rng() % opt.max_read;
        std::size_t len = std::min(asked, s.bytes.size() - pos);
        std::vector<steward::unique_fd> batch;
        bool truncated = false;
        while (call < s.calls.size() && s.calls[call].last <= pos) ++call;
        // The calls this read reaches: it takes the first batch it meets and stops at that call's end.
        for (std::size_t c = call; c < s.calls.size() && s.calls[c].first < pos + len; ++c) {
            if (s.calls[c].fds.empty() || s.calls[c].first < pos) continue;  // no batch or already taken
            len = std::min(len, s.calls[c].last - pos);
            batch = std::move(s.calls[c].fds);
            s.calls[c].fds.clear();
            if (s.calls[c].truncate_to < batch.size()) {
                batch.resize(s.calls[c].truncate_to);  // the rest is closed, as the kernel drops it
                truncated = true;
            }
            break;
        }
        // A batch whose call began before this read was taken by an earlier read.
        auto space = dec.prepare(asked);
        std::copy_n(s.bytes.begin() + static_cast<std::ptrdiff_t>(pos), len, space.begin());
        dec.commit(len, std::move(batch), truncated);
        pos += len;
        if (opt.drain_each_read) drain();
    }
    if (!ec) drain();
    return events;
}

struct assembled {
    std::map<std::uint64_t, std::vector<int>> ok;  // request id -> descriptor numbers received
    std::vector<std::uint64_t> truncated;
    std::vector<std::uint64_t> not_available;
};

assembled assemble(std::vector<native::stream_decoder::event>& events, std::error_code& ec) {
    assembled out;
    native::reply_assembler assembler;
    for (auto& ev : events) {
        const auto* part = std::get_if<native::reply>(&ev.msg);
        if (!part) continue;
        auto done = assembler.add(*part, std::move(ev.fds), ev.truncated, ec);
        if (ec) return out;
        if (!done) continue;
        if (done->error == steward::errc::control_truncated) {
            out.truncated.push_back(done->request_id);
        } else if (done->status == native::reply_status::not_available) {
            out.not_available.push_back(done->request_id);
        } else {
            auto& v = out.ok[done->request_id];
            for (auto& fd : done->fds) v.push_back(fd.get());
        }
    }
    return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(native_fifo_coalesced_batches) {
    const int fds_before = steward::test::open_fd_count();
    std::mt19937_64 rng(31);
    for (int round = 0; round < 150; ++round) {
        const std::uint16_t version = round % 3 == 0 ? 1 : 2;
        std::vector<std::pair<std::uint64_t, std::uint32_t>> replies;
        const int n = 1 + static_cast<int>(rng() % 40);
        for (int i = 0; i < n; ++i) {
            const auto r = rng() % 20;
            const std::uint32_t fds = r == 0   ? 0
                                      : r == 1 ? 254 + static_cast<std::uint32_t>(rng() % 400)
                                               : 1 + static_cast<std::uint32_t>(rng() % 6);
            replies.emplace_back(static_cast<std::uint64_t>(i + 1), fds);
        }
        sent_stream s(replies, version);
        if (version == 2) {
            BOOST_TEST(s.calls.size() < replies.size() + 2);  // several parts per batch happen
        }
        native::stream_decoder dec;
        dec.set_version(version);
        std::error_code ec;
        receive_options opt;
        opt.max_read = rng() % 2 ? 64 : 9000;
        opt.drain_each_read = rng() % 4 != 0;
        auto events = receive_calls(s, dec, rng, ec, opt);
        BOOST_REQUIRE_MESSAGE(!ec, ec.message() << " round " << round);
        BOOST_TEST(dec.buffered() == 0u);
        BOOST_TEST(dec.held_descriptors() == 0u);
        const assembled got = assemble(events, ec);
        BOOST_REQUIRE(!ec);
        BOOST_TEST(got.truncated.empty());
        std::size_t na = 0;
        for (const auto& [id, count] : replies) {
            if (count == 0) {
                ++na;
                continue;
            }
            const auto it = got.ok.find(id);
            BOOST_REQUIRE(it != got.ok.end());
            BOOST_TEST((it->second == s.numbers[id]), "request " << id);  // every descriptor, in order
        }
        BOOST_TEST(got.not_available.size() == na);
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(native_fifo_protocol_errors) {
    const int fds_before = steward::test::open_fd_count();
    std::mt19937_64 rng(37);
    using steward::errc;
    // Surplus descriptors on the first batch: found once the stream passes the next batch's read.
    for (int round = 0; round < 20; ++round) {
        sent_stream s({{1, 2}, {2, 3}, {3, 248}, {4, 253}, {5, 1}}, 2, {1});
        BOOST_REQUIRE(s.calls.size() == 3u);
        native::stream_decoder dec;
        std::error_code ec;
        (void)receive_calls(s, dec, rng, ec);
        BOOST_TEST((ec == errc::malformed_message));
        BOOST_TEST(dec.held_descriptors() == 0u);  // closed at once
    }
    // Surplus with no batch after it: held (nothing proves it wrong yet), closed with the decoder.
    {
        sent_stream s({{1, 2}, {2, 3}}, 2, {2});
        native::stream_decoder dec;
        std::error_code ec;
        auto events = receive_calls(s, dec, rng, ec);
        BOOST_TEST(!ec);
        BOOST_TEST(dec.held_descriptors() == 2u);
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);

    // Hand-made reads: parts and the batches that come with each read.
    auto run = [](const std::vector<native::reply>& parts,
                  const std::vector<std::pair<std::size_t, std::size_t>>& reads /* (frames, fds) */) {
        std::vector<std::byte> bytes;
        std::vector<std::size_t> ends;
        for (const auto& p : parts) {
            native::append_frame(bytes, p);
            ends.push_back(bytes.size());
        }
        native::stream_decoder dec;
        std::error_code ec;
        std::size_t pos = 0, frame = 0;
        for (const auto& [frames, fds] : reads) {
            frame += frames;
            const std::size_t to = frames == 0 ? pos : ends[frame - 1];
            std::vector<steward::unique_fd> batch;
            for (std::size_t i = 0; i < fds; ++i) batch.push_back(open_null());
            auto space = dec.prepare(to - pos + 1);  // short reads: the kernel stopped there
            std::copy(bytes.begin() + static_cast<std::ptrdiff_t>(pos),
                      bytes.begin() + static_cast<std::ptrdiff_t>(to), space.begin());
            dec.commit(to - pos, std::move(batch));
            pos = to;
            while (dec.next(ec)) {
            }
            if (ec) break;
        }
        return ec;
    };
    const auto one = [](std::uint64_t id, std::uint32_t n) { return native::split_reply(id, n)[0]; };
    // The honest shapes: several parts in one batch; a second batch after the first was used up.
    BOOST_TEST(!run({one(1, 2), one(2, 3)}, {{2, 5}}));
    BOOST_TEST(!run({one(1, 2), one(2, 3), one(3, 1)}, {{2, 5}, {1, 1}}));
    BOOST_TEST(!run({one(1, 2), one(2, 3), one(3, 1)},
                    {{1, 5}, {1, 0}, {1, 1}}));  // parts of a batch in later reads
    // A part finding fewer than it declares in an untruncated batch.
    BOOST_TEST((run({one(1, 2), one(2, 3)}, {{2, 4}}) == errc::malformed_message));
    // A part that would take from two batches (the first one short, the second arriving).
    BOOST_TEST((run({one(1, 2), one(2, 3)}, {{1, 3}, {1, 2}}) == errc::malformed_message));
    // A new batch while the FIFO still holds descriptors of the previous one.
    BOOST_TEST((run({one(1, 2), one(2, 3), one(3, 1)}, {{1, 3}, {1, 4}, {1, 0}}) == errc::malformed_message));
    // Descriptors that never came: the part's read brought no batch.
    BOOST_TEST((run({one(1, 2)}, {{1, 0}}) == errc::malformed_message));
    // Descriptors that came with a read of no bytes.
    BOOST_TEST((run({one(1, 2)}, {{0, 2}, {1, 0}}) == errc::malformed_message));
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(native_fifo_truncated_batch_serves_a_prefix) {
    const int fds_before = steward::test::open_fd_count();
    std::mt19937_64 rng(41);
    // One sendmsg: requests 1..3 with 2 descriptors each (6); MSG_CTRUNC leaves 3. Request 1 gets
    // its 2, request 2 gets 1 (closed), request 3 none; the next sendmsg is unaffected.
    for (int round = 0; round < 40; ++round) {
        sent_stream s({{1, 2}, {2, 2}, {3, 2}, {4, 252}, {5, 1}}, 2);
        BOOST_REQUIRE(s.calls.size() == 2u);
        s.calls[0].truncate_to = 3;
        native::stream_decoder dec;
        std::error_code ec;
        receive_options opt;
        opt.max_read = 9000;  // each sendmsg arrives whole with a short read
        opt.fixed = true;
        opt.drain_each_read = round % 2 == 0;
        auto events = receive_calls(s, dec, rng, ec, opt);
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
        const assembled got = assemble(events, ec);
        BOOST_REQUIRE(!ec);
        BOOST_TEST((got.truncated == std::vector<std::uint64_t>{2, 3}));
        BOOST_REQUIRE(got.ok.size() == 3u);
        BOOST_TEST((got.ok.at(1) == s.numbers[1]));
        BOOST_TEST((got.ok.at(4) == s.numbers[4]));
        BOOST_TEST((got.ok.at(5) == s.numbers[5]));
        BOOST_TEST(dec.held_descriptors() == 0u);
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);

    // When the truncated read filled the buffer, the truncated sendmsg's parts may go on in later
    // reads, up to the read that brought the next batch: a short part starting there could be
    // either sendmsg's, so the decoder ends the stream with control_truncated rather than guess.
    // A short read (the kernel stopped at the end of that sendmsg) settles it and the stream goes
    // on. Either way nobody gets another reply's descriptors and nothing leaks.
    int ended = 0, served = 0;
    for (int round = 0; round < 200; ++round) {
        sent_stream s({{1, 2}, {2, 2}, {3, 2}, {4, 252}, {5, 1}}, 2);
        const std::size_t kept = rng() % 6;
        s.calls[0].truncate_to = kept;
        native::stream_decoder dec;
        std::error_code ec;
        receive_options opt;
        opt.fixed = rng() % 2 == 0;
        opt.max_read = opt.fixed ? 9000 : 1 + rng() % 80;
        auto events = receive_calls(s, dec, rng, ec, opt);
        if (opt.fixed) BOOST_TEST(!ec);
        if (ec) {
            BOOST_TEST((ec == steward::errc::control_truncated));
            BOOST_TEST(dec.held_descriptors() == 0u);
            ++ended;
        } else {
            ++served;
        }
        std::error_code aec;
        const assembled got = assemble(events, aec);
        BOOST_TEST(!aec);
        for (const auto& [id, nums] : got.ok) BOOST_TEST((nums == s.numbers[id]), "request " << id);
        if (kept < 4) BOOST_TEST(!got.ok.contains(2));
        BOOST_TEST(!got.ok.contains(3));
    }
    BOOST_TEST(ended > 0);  // both outcomes were exercised
    BOOST_TEST(served > 0);
    BOOST_TEST(steward::test::open_fd_count() == fds_before);

    // Version 1: a truncated batch belongs to its one part; the next part takes the next batch.
    {
        sent_stream s({{1, 2}, {2, 2}, {3, 300}}, 1);
        s.calls[1].truncate_to = 1;  // calls: HELLO_ACK | part of 1 | part of 2 | ...
        native::stream_decoder dec;
        dec.set_version(1);
        std::error_code ec;
        receive_options opt;
        opt.max_read = 7;
        auto events = receive_calls(s, dec, rng, ec, opt);
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
        const assembled got = assemble(events, ec);
        BOOST_TEST((got.truncated == std::vector<std::uint64_t>{1}));
        BOOST_TEST((got.ok.at(2) == s.numbers[2]));
        BOOST_TEST((got.ok.at(3) == s.numbers[3]));
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(native_fifo_allocation_free_path_matches) {
    // next(msg, fds, truncated, ec) + add_from() give what next(ec) + add() give, and reuse the
    // caller's vector: the client takes about one descriptor per reply at a high rate.
    const int fds_before = steward::test::open_fd_count();
    std::mt19937_64 rng(43);
    std::vector<std::pair<std::uint64_t, std::uint32_t>> replies;
    for (std::uint64_t id = 1; id <= 300; ++id)
        replies.emplace_back(id, id % 50 == 0 ? 300 : id % 7 == 0 ? 0 : 1);
    sent_stream s(replies, 2);
    native::stream_decoder dec;
    native::reply_assembler assembler;
    std::map<std::uint64_t, std::vector<int>> got;
    std::size_t not_available = 0;
    native::message msg;
    std::vector<steward::unique_fd> fds;
    fds.reserve(native::max_fds_per_part);
    const auto* const storage = fds.data();
    bool truncated = false;
    std::error_code ec;
    std::size_t pos = 0, call = 0;
    while (pos < s.bytes.size()) {
        // Reads of 1 KiB the kernel way (as receive_calls, written out here for this API).
        std::size_t len = std::min<std::size_t>(1024, s.bytes.size() - pos);
        std::vector<steward::unique_fd> batch;
        while (call < s.calls.size() && s.calls[call].last <= pos) ++call;
        for (std::size_t c = call; c < s.calls.size() && s.calls[c].first < pos + len; ++c) {
            if (s.calls[c].fds.empty() || s.calls[c].first < pos) continue;
            len = std::min(len, s.calls[c].last - pos);
            batch = std::move(s.calls[c].fds);
            s.calls[c].fds.clear();
            break;
        }
        auto space = dec.prepare(1024);
        std::copy_n(s.bytes.begin() + static_cast<std::ptrdiff_t>(pos), len, space.begin());
        dec.commit(len, std::move(batch), false);
        pos += len;
        while (dec.next(msg, fds, truncated, ec)) {
            BOOST_REQUIRE(!truncated);
            const auto* part = std::get_if<native::reply>(&msg);
            if (!part) continue;
            auto done = assembler.add_from(*part, fds, truncated, ec);
            BOOST_REQUIRE(!ec);
            if (!done) continue;
            if (done->status == native::reply_status::not_available) {
                ++not_available;
                continue;
            }
            for (auto& fd : done->fds) got[done->request_id].push_back(fd.get());
        }
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
    }
    BOOST_TEST(fds.data() == storage);  // never reallocated
    BOOST_TEST(not_available == 300u / 7);
    for (const auto& [id, n] : replies) {
        if (n == 0) continue;
        BOOST_TEST((got[id] == s.numbers[id]), "request " << id);
    }
    // add_from closes what it does not keep: a short part's and a refused part's descriptors.
    {
        std::vector<steward::unique_fd> some;
        some.push_back(open_null());
        some.push_back(open_null());
        native::reply_assembler a;
        auto done = a.add_from(native::split_reply(9, 3)[0], some, true, ec);
        BOOST_REQUIRE(done.has_value());
        BOOST_TEST((done->error == steward::errc::control_truncated));
        BOOST_TEST(!some[0]);
        BOOST_TEST(!some[1]);
        some.clear();
        some.push_back(open_null());
        (void)a.add_from(native::split_reply(9, 3)[0], some, false, ec);  // fewer, not truncated
        BOOST_TEST((ec == steward::errc::malformed_message));
        BOOST_TEST(!some[0]);
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before + 0);
}

BOOST_AUTO_TEST_CASE(native_fifo_explicit_short_read) {
    // Bytes copied in from elsewhere (what followed QUICK_ACK in its read) can say whether their
    // read was short: after MSG_CTRUNC that decides whether the next batch's parts are served.
    const int fds_before = steward::test::open_fd_count();
    for (const bool short_read : {true, false}) {
        sent_stream s({{1, 2}, {2, 2}, {3, 252}, {4, 1}}, 2);
        BOOST_REQUIRE(s.calls.size() == 2u);
        native::stream_decoder dec;
        std::error_code ec;
        std::vector<native::stream_decoder::event> events;
        // Read 1: all of call 0, its batch cut to 3 (MSG_CTRUNC); read 2: call 1 with its batch.
        for (std::size_t c = 0; c < 2 && !ec; ++c) {
            auto& k = s.calls[c];
            auto batch = std::move(k.fds);
            const bool truncated = c == 0;
            if (truncated) batch.resize(3);
            auto space = dec.prepare(k.last - k.first);
            std::copy(s.bytes.begin() + static_cast<std::ptrdiff_t>(k.first),
                      s.bytes.begin() + static_cast<std::ptrdiff_t>(k.last), space.begin());
            dec.commit(k.last - k.first, std::move(batch), truncated, c == 0 ? short_read : true);
            while (auto ev = dec.next(ec)) events.push_back(std::move(*ev));
        }
        if (short_read) {
            BOOST_REQUIRE_MESSAGE(!ec, ec.message());
            const assembled got = assemble(events, ec);
            BOOST_TEST((got.truncated == std::vector<std::uint64_t>{2}));
            BOOST_TEST((got.ok.at(1) == s.numbers[1]));
            BOOST_TEST((got.ok.at(3) == s.numbers[3]));
            BOOST_TEST((got.ok.at(4) == s.numbers[4]));
        } else {
            BOOST_TEST((ec == steward::errc::control_truncated));  // could have been call 0's part
            BOOST_TEST(dec.held_descriptors() == 0u);
        }
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

// ---- quick_connect.hpp: the client's ack_reader ------------------------------------------------

namespace {

std::vector<std::byte> framed(std::span<const std::byte> payload) {
    return framing::make_frame(payload);
}

std::vector<std::byte> challenge_frame() {
    std::string text = "#CHALLENGE#{sha256}";
    text.append(40, 'n');
    return framed(std::as_bytes(std::span<const char>(text.data(), text.size())));
}

}  // namespace

BOOST_AUTO_TEST_CASE(quick_ack_reader) {
    namespace quick = steward::detail::quick;
    const steward::authkey key = counting_key();
    const auto nonce = counting_nonce();
    std::vector<std::byte> ack;
    quick::append_ack_frame(ack, key, nonce, native::hello_ack{2, 64, 65536});
    std::vector<std::byte> reply;
    native::append_frame(reply, native::split_reply(1, 1)[0]);
    auto concat = [](std::initializer_list<std::span<const std::byte>> parts) {
        std::vector<std::byte> out;
        for (auto p : parts) out.insert(out.end(), p.begin(), p.end());
        return out;
    };
    using state = quick::ack_reader::state;
    auto feed_all = [&](const std::vector<std::byte>& bytes, std::size_t step,
                        const quick::nonce& n = counting_nonce()) {
        quick::ack_reader r(key, n);
        state st = state::need_more;
        for (std::size_t at = 0; at < bytes.size() && st == state::need_more; at += step)
            st = r.feed(std::span<const std::byte>(bytes).subspan(at, std::min(step, bytes.size() - at)));
        return std::tuple{st, r.error(), r.ack(), std::vector<std::byte>(r.rest().begin(), r.rest().end())};
    };
    for (std::size_t step : {std::size_t{1}, std::size_t{7}, std::size_t{4096}}) {
        // QUICK_ACK and what follows it.
        auto [st, err, a, rest] = feed_all(concat({ack, reply}), step);
        BOOST_TEST((st == state::acked));
        BOOST_TEST((a == native::hello_ack{2, 64, 65536}));
        if (step == 4096) BOOST_TEST(to_hex(rest) == to_hex(reply));  // the rest of that read
        // One leading challenge (the server looked before QUICK arrived) is skipped.
        std::tie(st, err, a, rest) = feed_all(concat({challenge_frame(), ack, reply}), step);
        BOOST_TEST((st == state::acked));
        // Two are not.
        std::tie(st, err, a, rest) = feed_all(concat({challenge_frame(), challenge_frame(), ack}), step);
        BOOST_TEST((st == state::failed));
        BOOST_TEST((err == steward::errc::malformed_message));
    }
    // A QUICK_ACK for another nonce, or signed with another key: the MAC does not verify.
    auto other = nonce;
    other[0] ^= std::byte{1};
    BOOST_TEST((std::get<1>(feed_all(ack, 4096, other)) == steward::errc::authentication_failed));
    std::vector<std::byte> forged;
    quick::append_ack_frame(forged, steward::authkey::generate(), nonce, native::hello_ack{2, 64, 65536});
    BOOST_TEST(
        (std::get<1>(feed_all(concat({forged, reply}), 4096)) == steward::errc::authentication_failed));
    // ERROR frames say why the server refused.
    auto error_frame = [](native::error_code_value code) {
        std::vector<std::byte> out;
        native::append_frame(out, native::error{code, "no"});
        return out;
    };
    BOOST_TEST((std::get<1>(feed_all(error_frame(native::error_code_value::authentication_failed), 4096)) ==
                steward::errc::authentication_failed));
    BOOST_TEST((std::get<1>(feed_all(error_frame(native::error_code_value::limit_exceeded), 4096)) ==
                steward::errc::limit_exceeded));
    BOOST_TEST(
        (std::get<0>(feed_all(error_frame(native::error_code_value::shutting_down), 4096)) == state::failed));
    BOOST_TEST((std::get<1>(feed_all(
                    concat({challenge_frame(), error_frame(native::error_code_value::authentication_failed)}),
                    3)) == steward::errc::authentication_failed));
    // #FAILURE#: a server that took the QUICK for the answer to its challenge.
    const std::string_view failure = "#FAILURE#";
    BOOST_TEST((std::get<1>(feed_all(concat({challenge_frame(), framed(std::as_bytes(std::span<const char>(
                                                                    failure.data(), failure.size())))}),
                                     4096)) == steward::errc::authentication_failed));
    // A frame above the handshake limit, a malformed header, something else entirely.
    BOOST_TEST((std::get<1>(feed_all(from_hex("00000101"), 4096)) == steward::errc::limit_exceeded));
    BOOST_TEST((std::get<1>(feed_all(from_hex("fffffffe"), 4096)) == steward::errc::malformed_message));
    BOOST_TEST((std::get<1>(feed_all(reply, 4096)) == steward::errc::malformed_message));
    // A QUICK_ACK with a wrong MAC after the challenge, fed byte by byte.
    auto bad = ack;
    bad.back() ^= std::byte{1};
    BOOST_TEST(
        (std::get<1>(feed_all(concat({challenge_frame(), bad}), 1)) == steward::errc::authentication_failed));
    // Once decided, more bytes change nothing.
    quick::ack_reader r(key, nonce);
    BOOST_TEST((r.feed(ack) == state::acked));
    BOOST_TEST((r.feed(bad) == state::acked));
    BOOST_TEST((r.ack() == native::hello_ack{2, 64, 65536}));
    // The wrappers are the codec's: same bytes as native::append_quick_frame.
    std::vector<std::byte> a1, a2;
    quick::append_request_frame(a1, key, sample_quick(true));
    native::append_quick_frame(a2, key, sample_quick(true));
    BOOST_TEST(to_hex(a1) == to_hex(a2));
    BOOST_TEST(quick::is_request(std::span<const std::byte>(a1).subspan(4)));
}

BOOST_AUTO_TEST_CASE(quick_mac_key_moves_its_key_schedule_and_leaves_nothing_usable_behind) {
    const steward::authkey key = counting_key();
    native::quick_mac_key original(key);
    const auto signed_part = from_hex("0853545744000200020000000000");
    const native::quick_mac_bytes expected = native::quick_mac(original, signed_part);

    native::quick_mac_key moved(std::move(original));
    BOOST_TEST(moved.is_for(key));
    BOOST_TEST((native::quick_mac(moved, signed_part) == expected));
    // The moved-from key is wiped: it is for no key and computes nothing.
    BOOST_TEST(!original.is_for(key));  // NOLINT(bugprone-use-after-move): checked on purpose
    native::quick_mac_bytes out{};
    BOOST_TEST(!original.compute(signed_part, {}, {}, out));  // NOLINT(bugprone-use-after-move)

    native::quick_mac_key other(steward::authkey::generate());
    BOOST_TEST(!(native::quick_mac(other, signed_part) == expected));
    other = std::move(moved);
    BOOST_TEST(other.is_for(key));
    BOOST_TEST((native::quick_mac(other, signed_part) == expected));
    BOOST_TEST(!moved.is_for(key));  // NOLINT(bugprone-use-after-move)
}
