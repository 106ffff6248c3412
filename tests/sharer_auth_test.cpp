#define BOOST_TEST_MODULE sharer_auth_test
#include "support/cloexec_socket.hpp"
#include "support/python3.hpp"
#include "support/test_support.hpp"

#include <steward/authkey.hpp>
#include <steward/error.hpp>
#include <steward/unique_fd.hpp>

#include "sharer/framing.hpp"
#include "sharer/handshake.hpp"
#include "sharer/handshake_driver.hpp"
#include "sharer/random.hpp"

#include <asio/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <filesystem>
#include <set>
#include <sstream>

using steward::test::bytes_of;
using steward::test::from_hex;
using steward::test::to_hex;
namespace auth = steward::detail::auth;
using hs_t = auth::handshake;
using namespace std::chrono_literals;

namespace {

steward::authkey counting_key() {
    steward::authkey k;
    for (std::size_t i = 0; i < k.bytes.size(); ++i) k.bytes[i] = static_cast<std::byte>(i);
    return k;
}

std::array<std::byte, auth::nonce_size> counting_nonce(unsigned first) {
    std::array<std::byte, auth::nonce_size> n;
    for (std::size_t i = 0; i < n.size(); ++i) n[i] = static_cast<std::byte>(first + i);
    return n;
}

std::string hmac_hex(auth::digest d, std::span<const std::byte> key, std::span<const std::byte> msg) {
    std::error_code ec;
    const auto mac = auth::hmac(d, key, msg, ec);
    BOOST_REQUIRE(!ec);
    return to_hex(mac);
}

std::vector<std::byte> concat(std::string_view prefix, std::span<const std::byte> rest) {
    auto out = bytes_of(prefix);
    out.insert(out.end(), rest.begin(), rest.end());
    return out;
}

// Runs two state machines against each other in memory; returns both final states.
void converse(hs_t& server, hs_t& client) {
    std::optional<std::vector<std::byte>> to_client = server.start();
    std::optional<std::vector<std::byte>> to_server = client.start();
    BOOST_REQUIRE(!to_server);
    for (int turns = 0; turns < 10 && (to_client || to_server); ++turns) {
        if (to_client) {
            auto msg = std::move(*to_client);
            to_client.reset();
            to_server = client.on_frame(msg);
        } else {
            auto msg = std::move(*to_server);
            to_server.reset();
            to_client = server.on_frame(msg);
        }
    }
}

std::pair<steward::detail::local_socket, steward::detail::local_socket> socket_pair(asio::io_context& ctx) {
    int sv[2];
    BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    steward::unique_fd a(sv[0]), b(sv[1]);
    steward::detail::local_socket s1(ctx), s2(ctx);
    s1.assign(asio::local::stream_protocol(), a.release());
    s2.assign(asio::local::stream_protocol(), b.release());
    return {std::move(s1), std::move(s2)};
}

// The io_uring service opens its ring on the first socket; count descriptors after that.
int fd_count_after_warm_up(asio::io_context& ctx) {
    { auto pair = socket_pair(ctx); }
    return steward::test::open_fd_count();
}

struct temp_dir {
    std::filesystem::path path;
    temp_dir() {
        char tmpl[] = "/tmp/stw-auth-XXXXXX";
        BOOST_REQUIRE(::mkdtemp(tmpl));
        path = tmpl;
    }
    ~temp_dir() { std::filesystem::remove_all(path); }
};

}  // namespace

// ---- HMAC known answers ------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(hmac_rfc_vectors) {
    // RFC 2202 (MD5) and RFC 4231 (SHA-256) test case 2.
    const auto key = bytes_of("Jefe");
    const auto msg = bytes_of("what do ya want for nothing?");
    BOOST_TEST(hmac_hex(auth::digest::md5, key, msg) == "750c783e6ab0b503eaa86e310a5db738");
    BOOST_TEST(hmac_hex(auth::digest::sha256, key, msg) ==
               "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

BOOST_AUTO_TEST_CASE(handshake_fixed_vectors) {
    // Values computed once with CPython's hmac module: key = bytes(range(32)),
    // nonce = bytes(range(0x40, 0x68)).
    const auto key = counting_key();
    const auto nonce = counting_nonce(0x40);
    const auto challenge = auth::make_challenge(nonce);
    BOOST_TEST(to_hex(std::span(challenge).first(19)) == to_hex(bytes_of("#CHALLENGE#{sha256}")));
    BOOST_TEST(challenge.size() == 11u + 8u + 40u);
    std::error_code ec;
    const auto answer = auth::answer_challenge(key, challenge, ec);
    BOOST_REQUIRE(!ec);
    BOOST_TEST(to_hex(answer) == to_hex(bytes_of("{sha256}")) +
                                     "aeef28587ce691021a142d72ca231354dea905bb09303a76d8fa4670dc2f6f42");
    const auto message = std::span(challenge).subspan(11);
    BOOST_TEST(auth::verify_response(key, message, answer));
    // A 3.11 client answers the same challenge with a raw HMAC-MD5 over the whole message.
    BOOST_TEST(auth::verify_response(key, message, from_hex("34ae76d998b73c102c5e27bdd6271e88")));
    // A 3.11 server's challenge: 20 bare random bytes, answered with raw HMAC-MD5.
    std::array<std::byte, 20> legacy;
    for (std::size_t i = 0; i < legacy.size(); ++i) legacy[i] = static_cast<std::byte>(0xa0 + i);
    const auto legacy_answer = auth::answer_challenge(key, concat("#CHALLENGE#", legacy), ec);
    BOOST_REQUIRE(!ec);
    BOOST_TEST(to_hex(legacy_answer) == "4b0560f7af0e63e9dd3662c0819d69a0");
    // Other digests a challenge may name: answered with that digest, prefix included in the MAC.
    const std::vector<std::pair<std::string, std::string>> named = {
        {"sha384",
         "9227169b2e11a742a3ca8bb0be7e38a37b75200ba9a1d5afe62e904bf1aca05959426f35ef31de59b3d7c0463282948a"},
        {"sha3_256", "53dedc0e30c144ef926bc533db6d1478c11763c9b66fc2798da48d8262c14c75"},
        {"sha3_384",
         "dcc59de1f8c27369fe0fd3a60f8c1f66058fc0127c888b66ef99eaa4cd85869f6794faacfdd4c5dca3fae9eaaf450af6"},
        {"md5", "e1536d760f3d92177c499634323b5034"},
    };
    for (const auto& [name, mac] : named) {
        const auto msg = concat("{" + name + "}", nonce);
        const auto a = auth::answer_challenge(key, concat("#CHALLENGE#", msg), ec);
        BOOST_REQUIRE_MESSAGE(!ec, name);
        BOOST_TEST(to_hex(a) == to_hex(bytes_of("{" + name + "}")) + mac, name);
        BOOST_TEST(auth::verify_response(key, msg, a), name);
    }
}

BOOST_AUTO_TEST_CASE(handshake_vectors_match_cpython_hmac,
                     *boost::unit_test::precondition(steward::test::python3_available)) {
    std::ostringstream script;
    script << "import hmac\n";
    std::vector<std::string> ours;
    for (int i = 0; i < 6; ++i) {
        const auto key = steward::authkey::generate();
        std::array<std::byte, auth::nonce_size> nonce;
        for (auto& b : nonce) b = steward::authkey::generate().bytes[0];
        const auto challenge = auth::make_challenge(nonce);
        const auto msg_hex = to_hex(std::span(challenge).subspan(11));
        std::error_code ec;
        ours.push_back(to_hex(auth::answer_challenge(key, challenge, ec)));
        BOOST_REQUIRE(!ec);
        script << "k=bytes.fromhex('" << key.to_hex() << "'); m=bytes.fromhex('" << msg_hex << "')\n"
               << "print((b'{sha256}' + hmac.new(k, m, 'sha256').digest()).hex())\n"
               << "print(hmac.new(k, m, 'md5').hexdigest())\n"
               << "print(hmac.new(k, m[8:28], 'md5').hexdigest())\n";
        ours.push_back(hmac_hex(auth::digest::md5, key.bytes, std::span(challenge).subspan(11)));
        const auto legacy = std::span(challenge).subspan(19, 20);
        ours.push_back(to_hex(auth::answer_challenge(key, concat("#CHALLENGE#", legacy), ec)));
    }
    std::istringstream theirs(steward::test::run_python(script.str()));
    std::string line;
    for (const auto& expected : ours) {
        BOOST_REQUIRE(std::getline(theirs, line));
        BOOST_TEST(line == expected);
    }
}

BOOST_AUTO_TEST_CASE(verify_response_refusals) {
    const auto key = counting_key();
    const auto challenge = auth::make_challenge(counting_nonce(0x40));
    const auto message = std::span(challenge).subspan(11);
    std::error_code ec;
    auto good = auth::answer_challenge(key, challenge, ec);
    BOOST_REQUIRE(auth::verify_response(key, message, good));
    auto flipped = good;
    flipped.back() ^= std::byte{1};
    BOOST_TEST(!auth::verify_response(key, message, flipped));
    BOOST_TEST(!auth::verify_response(steward::authkey::generate(), message, good));
    BOOST_TEST(!auth::verify_response(key, message, std::span(good).first(good.size() - 1)));
    BOOST_TEST(!auth::verify_response(key, message, {}));
    // 20 bytes: legacy MD5 by length, which can never match a 16-byte MAC.
    BOOST_TEST(!auth::verify_response(key, message, std::vector<std::byte>(20)));
    // Unknown or malformed digest prefixes.
    BOOST_TEST(!auth::verify_response(key, message, concat("{sha1}", std::span(good).subspan(8))));
    BOOST_TEST(!auth::verify_response(key, message, concat("{sha256", std::span(good).subspan(8))));
    BOOST_TEST(!auth::verify_response(key, message, concat("sha256}", std::span(good).subspan(8))));
    // The right MAC under a different digest name.
    BOOST_TEST(!auth::verify_response(key, message, concat("{sha3_256}", std::span(good).subspan(8))));
    // A correct answer to another challenge (replay).
    const auto other = auth::make_challenge(counting_nonce(0x41));
    BOOST_TEST(!auth::verify_response(key, std::span(other).subspan(11), good));
}

BOOST_AUTO_TEST_CASE(answer_challenge_refusals) {
    const auto key = counting_key();
    const auto nonce = counting_nonce(1);
    for (const auto& bad : {concat("#CHALLENGE", nonce), concat("#CHALLENGE#", std::span(nonce).first(19)),
                            concat("#CHALLENGE#", std::span(nonce).first(16)),
                            concat("#CHALLENGE#{sha1}", nonce), concat("#CHALLENGE#{sha256", nonce),
                            concat("#CHALLENGE#", std::span(nonce).first(21)), bytes_of("#WELCOME#")}) {
        std::error_code ec;
        const auto answer = auth::answer_challenge(key, bad, ec);
        BOOST_TEST((ec == steward::errc::malformed_message));
        BOOST_TEST(answer.empty());
    }
}

// ---- the state machine -----------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(state_machine_same_key_succeeds) {
    const auto key = steward::authkey::generate();
    hs_t server(hs_t::role::server, key), client(hs_t::role::client, key);
    converse(server, client);
    BOOST_TEST((server.current() == hs_t::state::succeeded));
    BOOST_TEST((client.current() == hs_t::state::succeeded));
    BOOST_TEST(!server.error());
    BOOST_TEST(!client.error());
}

BOOST_AUTO_TEST_CASE(state_machine_wrong_key_fails_both) {
    hs_t server(hs_t::role::server, steward::authkey::generate());
    hs_t client(hs_t::role::client, steward::authkey::generate());
    converse(server, client);
    BOOST_TEST((server.current() == hs_t::state::failed));
    BOOST_TEST((client.current() == hs_t::state::failed));
    BOOST_TEST((server.error() == steward::errc::authentication_failed));
    BOOST_TEST((client.error() == steward::errc::authentication_failed));
}

BOOST_AUTO_TEST_CASE(state_machine_exact_sequence) {
    const auto key = counting_key();
    hs_t server(hs_t::role::server, key, counting_nonce(0x40));
    hs_t client(hs_t::role::client, key, counting_nonce(0x80));
    const auto c1 = server.start();
    BOOST_REQUIRE(c1);
    BOOST_TEST(to_hex(*c1) == to_hex(auth::make_challenge(counting_nonce(0x40))));
    BOOST_TEST(!client.start());
    const auto r1 = client.on_frame(*c1);  // client answers
    BOOST_REQUIRE(r1);
    BOOST_TEST(to_hex(*r1) == to_hex(bytes_of("{sha256}")) +
                                  "aeef28587ce691021a142d72ca231354dea905bb09303a76d8fa4670dc2f6f42");
    const auto w1 = server.on_frame(*r1);
    BOOST_REQUIRE(w1);
    BOOST_TEST(to_hex(*w1) == to_hex(bytes_of("#WELCOME#")));
    const auto c2 = client.on_frame(*w1);  // client now delivers its own challenge
    BOOST_REQUIRE(c2);
    BOOST_TEST(to_hex(*c2) == to_hex(auth::make_challenge(counting_nonce(0x80))));
    BOOST_TEST((client.current() == hs_t::state::running));
    const auto r2 = server.on_frame(*c2);
    BOOST_REQUIRE(r2);
    const auto w2 = client.on_frame(*r2);
    BOOST_REQUIRE(w2);
    BOOST_TEST(to_hex(*w2) == to_hex(bytes_of("#WELCOME#")));
    BOOST_TEST((client.current() == hs_t::state::succeeded));
    BOOST_TEST(!server.on_frame(*w2));
    BOOST_TEST((server.current() == hs_t::state::succeeded));
    // Once finished, further input changes nothing.
    BOOST_TEST(!server.on_frame(*w2));
    BOOST_TEST((server.current() == hs_t::state::succeeded));
}

BOOST_AUTO_TEST_CASE(state_machine_client_rejects_a_bad_answer) {
    // A peer that passes the first half (it says #WELCOME# regardless) but cannot answer the
    // client's challenge: the client sends #FAILURE# and fails.
    const auto key = counting_key();
    hs_t client(hs_t::role::client, key);
    (void)client.start();
    const auto r1 = client.on_frame(auth::make_challenge(counting_nonce(3)));
    BOOST_REQUIRE(r1);
    const auto c2 = client.on_frame(bytes_of("#WELCOME#"));
    BOOST_REQUIRE(c2);
    std::error_code ec;
    const auto wrong = auth::answer_challenge(steward::authkey::generate(), *c2, ec);
    BOOST_REQUIRE(!ec);
    const auto out = client.on_frame(wrong);
    BOOST_REQUIRE(out);
    BOOST_TEST(to_hex(*out) == to_hex(bytes_of("#FAILURE#")));
    BOOST_TEST((client.error() == steward::errc::authentication_failed));
}

BOOST_AUTO_TEST_CASE(state_machine_garbage) {
    const auto key = counting_key();
    {  // client expecting a challenge gets something else
        hs_t client(hs_t::role::client, key);
        (void)client.start();
        BOOST_TEST(!client.on_frame(bytes_of("hello")));
        BOOST_TEST((client.error() == steward::errc::malformed_message));
    }
    {  // client expecting #WELCOME# gets #FAILURE# (its answer was refused)
        hs_t client(hs_t::role::client, key);
        (void)client.start();
        (void)client.on_frame(auth::make_challenge(counting_nonce(3)));
        BOOST_TEST(!client.on_frame(bytes_of("#FAILURE#")));
        BOOST_TEST((client.error() == steward::errc::authentication_failed));
    }
    {  // ... or junk
        hs_t client(hs_t::role::client, key);
        (void)client.start();
        (void)client.on_frame(auth::make_challenge(counting_nonce(3)));
        BOOST_TEST(!client.on_frame(bytes_of("#WELCOME#!")));
        BOOST_TEST((client.error() == steward::errc::malformed_message));
    }
    {  // server gets junk instead of an answer: #FAILURE#
        hs_t server(hs_t::role::server, key);
        (void)server.start();
        const auto out = server.on_frame(bytes_of("#WELCOME#"));
        BOOST_REQUIRE(out);
        BOOST_TEST(to_hex(*out) == to_hex(bytes_of("#FAILURE#")));
        BOOST_TEST((server.error() == steward::errc::authentication_failed));
    }
    {  // on_frame before start
        hs_t server(hs_t::role::server, key);
        BOOST_TEST(!server.on_frame(bytes_of("x")));
        BOOST_TEST((server.current() == hs_t::state::failed));
    }
}

// ---- the coroutine driver over real sockets ----------------------------------------------------

STEWARD_CORO_TEST(driver_both_roles_over_socketpair) {
    using namespace asio::experimental::awaitable_operators;
    const int fds_before = fd_count_after_warm_up(ctx);
    {
        auto [a, b] = socket_pair(ctx);
        const auto key = steward::authkey::generate();
        auto [es, ec] = co_await (steward::detail::authenticate_as_server(a, key) &&
                                  steward::detail::authenticate_as_client(b, key));
        BOOST_TEST(!es);
        BOOST_TEST(!ec);
        // Nothing after the handshake was consumed: a frame sent now arrives intact.
        const auto payload = bytes_of("after");
        BOOST_TEST(!(co_await steward::detail::write_frame(b, payload)));
        std::vector<std::byte> got;
        BOOST_TEST(!(co_await steward::detail::read_frame(a, got, 256)));
        BOOST_TEST(to_hex(got) == to_hex(payload));
    }
    {
        auto [a, b] = socket_pair(ctx);
        auto [es, ec] = co_await (steward::detail::authenticate_as_server(a, steward::authkey::generate()) &&
                                  steward::detail::authenticate_as_client(b, steward::authkey::generate()));
        BOOST_TEST((es == steward::errc::authentication_failed));
        BOOST_TEST((ec == steward::errc::authentication_failed));
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

STEWARD_CORO_TEST(driver_deadline) {
    auto [a, b] = socket_pair(ctx);
    const auto key = steward::authkey::generate();
    // The peer never answers: both roles give up at their deadline.
    auto started = std::chrono::steady_clock::now();
    BOOST_TEST((co_await steward::detail::authenticate_as_server(a, key, 200ms) == steward::errc::timed_out));
    BOOST_CHECK(std::chrono::steady_clock::now() - started >= 200ms);
    auto [c, d] = socket_pair(ctx);
    BOOST_TEST((co_await steward::detail::authenticate_as_client(c, key, 200ms) == steward::errc::timed_out));
    // A peer that stalls after the first message is cut off too.
    auto [e, f] = socket_pair(ctx);
    BOOST_TEST(!(co_await steward::detail::write_frame(f, auth::make_challenge(counting_nonce(1)))));
    BOOST_TEST((co_await steward::detail::authenticate_as_client(e, key, 200ms) == steward::errc::timed_out));
}

STEWARD_CORO_TEST(driver_refuses_oversize_and_eof) {
    const auto key = steward::authkey::generate();
    {
        auto [a, b] = socket_pair(ctx);
        const auto header = from_hex("00000101");  // 257 bytes announced
        co_await steward::detail::send_all(b, header);
        BOOST_TEST(
            (co_await steward::detail::authenticate_as_client(a, key) == steward::errc::limit_exceeded));
    }
    {
        auto [a, b] = socket_pair(ctx);
        const auto header = from_hex("ffffffff4000000000000000");  // 2^62 bytes announced
        co_await steward::detail::send_all(b, header);
        BOOST_TEST(
            (co_await steward::detail::authenticate_as_client(a, key) == steward::errc::limit_exceeded));
    }
    {
        auto [a, b] = socket_pair(ctx);
        co_await steward::detail::send_all(b, from_hex("80000000"));
        BOOST_TEST(
            (co_await steward::detail::authenticate_as_client(a, key) == steward::errc::malformed_message));
    }
    {  // the peer is gone: EOF while reading, EPIPE (never SIGPIPE) while writing
        auto [a, b] = socket_pair(ctx);
        b.close();
        BOOST_TEST((co_await steward::detail::authenticate_as_client(a, key) == asio::error::eof));
        auto [c, d] = socket_pair(ctx);
        d.close();
        BOOST_TEST((co_await steward::detail::authenticate_as_server(c, key) == asio::error::broken_pipe));
    }
}

// ---- interop with CPython's own multiprocessing.connection ---------------------------------------

STEWARD_CPYTHON_CORO_TEST(cpython_listener_against_our_client) {
    const int fds_before = fd_count_after_warm_up(ctx);
    temp_dir dir;
    const std::string path = (dir.path / "l").string();
    for (const bool right_key : {true, false}) {
        const auto key = steward::authkey::generate();
        steward::test::python_process py(
            {steward::test::python_script("mp_auth_peer.py"), "listen", path, key.to_hex()});
        BOOST_REQUIRE(py.read_line() == "ready");
        steward::detail::local_socket s(ctx);
        auto [cec] = co_await s.async_connect(asio::local::stream_protocol::endpoint(path),
                                              asio::as_tuple(asio::use_awaitable));
        BOOST_REQUIRE(!cec);
        const auto ec = co_await steward::detail::authenticate_as_client(
            s, right_key ? key : steward::authkey::generate());
        if (right_key) {
            BOOST_TEST(!ec, ec.message());
            std::vector<std::byte> got;
            BOOST_TEST(!(co_await steward::detail::read_frame(s, got, 256)));
            BOOST_TEST(to_hex(got) == to_hex(bytes_of("python-ok")));
            s.close();
            BOOST_TEST(py.wait() == 0);
        } else {
            BOOST_TEST((ec == steward::errc::authentication_failed), ec.message());
            s.close();
            BOOST_TEST(py.read_line().starts_with("auth-failed"));
            BOOST_TEST(py.wait() == 3);
        }
        std::filesystem::remove(path);
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

STEWARD_CPYTHON_CORO_TEST(cpython_client_against_our_server) {
    const int fds_before = fd_count_after_warm_up(ctx);
    temp_dir dir;
    const std::string path = (dir.path / "s").string();
    for (const bool right_key : {true, false}) {
        const auto key = steward::authkey::generate();
        auto acceptor = steward::test::cloexec_listener(ctx, path);
        steward::test::python_process py({steward::test::python_script("mp_auth_peer.py"), "connect", path,
                                          right_key ? key.to_hex() : steward::authkey::generate().to_hex()});
        auto [aec, s] = co_await steward::test::accept_cloexec(acceptor);
        BOOST_REQUIRE(!aec);
        const auto ec = co_await steward::detail::authenticate_as_server(s, key);
        if (right_key) {
            BOOST_TEST(!ec, ec.message());
            std::vector<std::byte> got;
            BOOST_TEST(!(co_await steward::detail::read_frame(s, got, 256)));
            BOOST_TEST(to_hex(got) == to_hex(bytes_of("hi from python")));
            s.close();
            BOOST_TEST(py.wait() == 0);
        } else {
            BOOST_TEST((ec == steward::errc::authentication_failed), ec.message());
            s.close();
            BOOST_TEST(py.read_line().starts_with("auth-failed"));
            BOOST_TEST(py.wait() == 3);
        }
        acceptor.close();
        std::filesystem::remove(path);
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

// ---- random bytes for nonces and share keys ----------------------------------------------------

BOOST_AUTO_TEST_CASE(buffered_random_bytes_are_never_handed_out_twice_not_even_across_fork) {
    using nonce = std::array<std::byte, 32>;
    auto draw = [] {
        nonce n{};
        std::error_code ec;
        steward::detail::fill_random_buffered(n, ec);
        BOOST_TEST(!ec);
        return n;
    };
    // More draws than one buffer holds: the refills too.
    std::set<nonce> seen;
    for (int i = 0; i < 40; ++i) {
        const nonce n = draw();
        BOOST_TEST(std::any_of(n.begin(), n.end(), [](std::byte b) { return b != std::byte{0}; }));
        BOOST_TEST(seen.insert(n).second);
    }
    // Larger requests than the buffer serves go to the kernel directly.
    std::vector<std::byte> big(1000);
    steward::detail::fill_random_buffered(big);
    BOOST_TEST(std::count(big.begin(), big.end(), std::byte{0}) < 100);

    // A forked child starts with a copy of this thread's buffer: it must not hand out the bytes
    // the parent hands out next.
    (void)draw();  // the buffer now holds unused bytes
    const std::string from_child = steward::test::output_of_child([&] {
        const nonce n = draw();
        return std::string(reinterpret_cast<const char*>(n.data()), n.size());
    });
    const nonce parents = draw();
    nonce childs{};
    BOOST_REQUIRE(from_child.size() == childs.size());
    std::memcpy(childs.data(), from_child.data(), childs.size());
    BOOST_TEST((parents != childs));
    BOOST_TEST(!seen.contains(childs));
}
