#define BOOST_TEST_MODULE sharer_quick_test
#include "support/test_support.hpp"

#include "support/fd_test_support.hpp"
#include "support/sharer_warmup.hpp"

#include <steward/error.hpp>
#include <steward/fetch.hpp>
#include <steward/sharer.hpp>

#include "sharer/framing.hpp"
#include "sharer/handshake.hpp"
#include "sharer/native_protocol.hpp"
#include "sharer/quick_connect.hpp"
#include "sharer/sharer_wire.hpp"

#include <asio/as_tuple.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

// Quick connect (native protocol version 2) end to end: the client's QUICK and the server's
// QUICK_ACK, the refusals both ways, the full-handshake path for a server of another uid, the
// challenge that raced the QUICK, and the server's coalesced replies. Raw sockets stand in for
// either side where the other one must misbehave.

using namespace steward;
namespace t = steward::test;
namespace quick = steward::detail::quick;
namespace native = steward::detail::native;
namespace wire = steward::detail::wire;
using steward::test::open_fd_count;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

namespace {

// ---- blocking raw-socket helpers ----

unique_fd connect_to(const std::string& path) {
    unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    BOOST_REQUIRE(fd);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    BOOST_REQUIRE(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
    return fd;
}

bool send_all(int fd, std::span<const std::byte> data, std::span<const int> fds = {}) {
    std::size_t sent = 0;
    while (sent < data.size()) {
        const wire::attempt a =
            wire::send_with_fds(fd, data.subspan(sent), sent == 0 ? fds : std::span<const int>{});
        if (a.err == EAGAIN) {
            ::usleep(100);
            continue;
        }
        if (a.err) return false;
        sent += a.bytes;
    }
    return true;
}

// recv_exact of n bytes (blocking); false on EOF/error.
bool recv_exact(int fd, std::byte* out, std::size_t n) {
    std::size_t have = 0;
    while (have < n) {
        const ssize_t r = ::recv(fd, out + have, n - have, 0);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            return false;
        }
        have += static_cast<std::size_t>(r);
    }
    return true;
}

// One frame, read exactly (header, then payload).
std::optional<std::vector<std::byte>> read_frame(int fd) {
    std::array<std::byte, 4> header{};
    if (!recv_exact(fd, header.data(), 4)) return std::nullopt;
    const auto n = wire::get_be<std::uint32_t>(header.data());
    if (n > 1 << 20) return std::nullopt;
    std::vector<std::byte> payload(n);
    if (n != 0 && !recv_exact(fd, payload.data(), n)) return std::nullopt;
    return payload;
}

void write_frame(int fd, std::span<const std::byte> payload) {
    std::vector<std::byte> frame;
    detail::framing::append_frame(frame, payload);
    BOOST_REQUIRE(send_all(fd, frame));
}

// One recvmsg: its bytes and its descriptors.
struct received {
    std::vector<std::byte> bytes;
    std::vector<unique_fd> fds;
    bool truncated = false;
};
received recv_batch(int fd) {
    received r;
    r.bytes.resize(64 * 1024);
    alignas(cmsghdr) char control[CMSG_SPACE(253 * sizeof(int))];
    iovec iov{r.bytes.data(), r.bytes.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n;
    do {
        n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    r.bytes.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
            int f = -1;
            std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
            r.fds.emplace_back(f);
        }
    }
    r.truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
    return r;
}

// Splits whole frames off the front of @p bytes.
std::vector<std::vector<std::byte>> split_frames(std::span<const std::byte> bytes) {
    std::vector<std::vector<std::byte>> out;
    while (bytes.size() >= 4) {
        const auto n = wire::get_be<std::uint32_t>(bytes.data());
        if (bytes.size() < 4 + n) break;
        out.emplace_back(bytes.begin() + 4, bytes.begin() + 4 + n);
        bytes = bytes.subspan(4 + n);
    }
    return out;
}

bool is_challenge(std::span<const std::byte> payload) {
    const std::string_view tag = detail::auth::challenge_tag;
    return payload.size() >= tag.size() && std::memcmp(payload.data(), tag.data(), tag.size()) == 0;
}

quick::nonce random_nonce() {
    quick::nonce n{};
    BOOST_REQUIRE(::getrandom(n.data(), n.size(), 0) == static_cast<ssize_t>(n.size()));
    return n;
}

ino_t inode_of(int fd) {
    struct stat st {};
    BOOST_REQUIRE(::fstat(fd, &st) == 0);
    return st.st_ino;
}

// A listener in a fresh directory for a scripted server thread.
struct fake_listener {
    std::string dir;
    std::string path;
    unique_fd fd;
    fake_listener() {
        char templ[] = "/tmp/steward-quick-test-XXXXXX";
        BOOST_REQUIRE(::mkdtemp(templ));
        dir = templ;
        path = dir + "/s";
        fd = unique_fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::memcpy(addr.sun_path, path.data(), path.size());
        BOOST_REQUIRE(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
        BOOST_REQUIRE(::listen(fd.get(), 4) == 0);
    }
    ~fake_listener() {
        fd.reset();
        ::unlink(path.c_str());
        ::rmdir(dir.c_str());
    }
    unique_fd accept() const { return unique_fd(::accept4(fd.get(), nullptr, nullptr, SOCK_CLOEXEC)); }
};

// The reply part of a one-descriptor share.
std::vector<std::byte> one_fd_reply(std::uint64_t id) {
    native::reply part;
    part.request_id = id;
    part.part_fds = 1;
    part.total_fds = 1;
    std::vector<std::byte> out(wire::reply_frame_size);
    wire::put_reply(out.data(), part);
    return out;
}

sharer_options options_with(const authkey& key) {
    sharer_options o;
    o.key = key;
    return o;
}

fetch_options dedicated(const authkey& key) {
    fetch_options o;
    o.key = key;
    o.pooled = false;
    return o;
}

struct uid_override {
    explicit uid_override(uid_t uid) { quick::set_peer_uid_override_for_tests(uid); }
    ~uid_override() { quick::set_peer_uid_override_for_tests(std::nullopt); }
    uid_override(const uid_override&) = delete;
    uid_override& operator=(const uid_override&) = delete;
};

}  // namespace

BOOST_AUTO_TEST_CASE(codec_round_trip_and_mac_binding) {
    const authkey key = authkey::generate();
    const authkey other = authkey::generate();
    quick::request q;
    q.client_nonce = random_nonce();
    q.first_fetch = native::fetch{7, share_key::generate()};
    std::vector<std::byte> frame;
    quick::append_request_frame(frame, key, q);
    BOOST_TEST(frame.size() == 4 + native::quick_size_with_fetch);
    const auto payload = std::span<const std::byte>(frame).subspan(4);
    std::error_code ec;
    const quick::request back = quick::decode_request(key, payload, ec);
    BOOST_TEST(!ec);
    BOOST_TEST(back.first_fetch.has_value());
    BOOST_TEST(back.first_fetch->request_id == 7u);
    BOOST_TEST((back.first_fetch->key == q.first_fetch->key));
    BOOST_TEST((back.client_nonce == q.client_nonce));
    (void)quick::decode_request(other, payload, ec);
    BOOST_TEST((ec == errc::authentication_failed));
    // Any flipped bit of the signed part breaks the MAC.
    std::vector<std::byte> tampered(payload.begin(), payload.end());
    tampered[20] ^= std::byte{1};
    (void)quick::decode_request(key, tampered, ec);
    BOOST_TEST((ec == errc::authentication_failed));
    tampered.pop_back();
    (void)quick::decode_request(key, tampered, ec);
    BOOST_TEST((ec == errc::malformed_message));

    std::vector<std::byte> ack;
    quick::append_ack_frame(ack, key, q.client_nonce, native::hello_ack{2, 64, 65536});
    const auto ack_payload = std::span<const std::byte>(ack).subspan(4);
    const native::hello_ack a = quick::decode_ack(key, q.client_nonce, ack_payload, ec);
    BOOST_TEST(!ec);
    BOOST_TEST(a.max_in_flight == 64u);
    // Bound to the client's nonce and to the server's context string: a client MAC is no ACK.
    (void)quick::decode_ack(key, random_nonce(), ack_payload, ec);
    BOOST_TEST((ec == errc::authentication_failed));
    (void)quick::decode_ack(other, q.client_nonce, ack_payload, ec);
    BOOST_TEST((ec == errc::authentication_failed));
}

STEWARD_CORO_TEST(quick_connect_fetch_from_another_process) {
    const authkey key = authkey::generate();
    asio::local::stream_protocol::socket warm(ctx);
    const int before = open_fd_count();
    {
        sharer s(ctx.get_executor(), options_with(key));
        unique_fd memfd = t::make_memfd("quick payload");
        const share_id id = s.share(memfd.get());
        const ino_t inode = inode_of(memfd.get());
        // The client runs in a forked child (blocking fetch: a connection of its own).
        auto child = t::fork_child([&] {
            std::error_code ec;
            auto fds = fetch(id, ec, dedicated(key));
            if (ec || fds.size() != 1) return 1;
            if (t::read_contents(fds[0].get()) != "quick payload") return 2;
            struct stat st {};
            if (::fstat(fds[0].get(), &st) != 0 || st.st_ino != inode) return 3;
            return t::is_cloexec(fds[0].get()) ? 0 : 4;
        });
        // Serve until the child confirmed.
        co_await s.async_wait_empty(use_tuple);
        BOOST_TEST(child.wait() == 0);
        const sharer_stats st = s.stats();
        BOOST_TEST(st.delivered == 1u);
        BOOST_TEST(st.refused_auth == 0u);
        BOOST_TEST(st.handshake_timeouts == 0u);
        co_await s.async_stop(std::chrono::seconds(1), use_tuple);
    }
    BOOST_TEST(open_fd_count() == before);
}

STEWARD_CORO_TEST(quick_connect_async_fetch_and_errors) {
    const authkey key = authkey::generate();
    asio::local::stream_protocol::socket warm(ctx);
    const int before = open_fd_count();
    {
        sharer s(ctx.get_executor(), options_with(key));
        unique_fd memfd = t::make_memfd("x");
        const share_id id = s.share(memfd.get());
        auto [ec, fds] = co_await async_fetch(ctx.get_executor(), id, use_tuple, dedicated(key));
        BOOST_TEST(!ec);
        BOOST_REQUIRE(fds.size() == 1u);
        BOOST_TEST(inode_of(fds[0].get()) == inode_of(memfd.get()));
        fds.clear();
        // Fetched once: the same id again is not available (same answer as unknown).
        auto [ec2, fds2] = co_await async_fetch(ctx.get_executor(), id, use_tuple, dedicated(key));
        BOOST_TEST((ec2 == errc::share_not_available));
        BOOST_TEST(fds2.empty());
        co_await s.async_wait_empty(use_tuple);
        BOOST_TEST(s.stats().delivered == 1u);
        co_await s.async_stop(std::chrono::seconds(1), use_tuple);
    }
    BOOST_TEST(open_fd_count() == before);
}

STEWARD_CORO_TEST(server_refuses_a_quick_with_another_key) {
    const authkey key = authkey::generate();
    asio::local::stream_protocol::socket warm(ctx);
    const int before = open_fd_count();
    {
        sharer s(ctx.get_executor(), options_with(key));
        unique_fd memfd = t::make_memfd("x");
        const share_id id = s.share(memfd.get());
        auto [ec, fds] =
            co_await async_fetch(ctx.get_executor(), id, use_tuple, dedicated(authkey::generate()));
        BOOST_TEST((ec == errc::authentication_failed));
        BOOST_TEST(fds.empty());
        BOOST_TEST(s.stats().refused_auth == 1u);
        BOOST_TEST(s.pending() == 1u);  // nothing changed
        // The family key still gets it.
        auto [ec2, fds2] = co_await async_fetch(ctx.get_executor(), id, use_tuple, dedicated(key));
        BOOST_TEST(!ec2);
        BOOST_TEST(fds2.size() == 1u);
        co_await s.async_stop(std::chrono::seconds(1), use_tuple);
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(server_answers_a_bad_mac_with_error_7_and_closes) {
    const authkey key = authkey::generate();
    sharer s(options_with(key));
    s.start_background();
    unique_fd memfd = t::make_memfd("x");
    const share_id id = s.share(memfd.get());
    for (const bool flip : {true, false}) {
        unique_fd c = connect_to(id.address());
        quick::request q;
        q.client_nonce = random_nonce();
        q.first_fetch = native::fetch{1, id.key()};
        std::vector<std::byte> frame;
        quick::append_request_frame(frame, key, q);
        if (flip)
            frame.back() ^= std::byte{0x80};  // the MAC
        else
            frame[4 + 5] = std::byte{0x7f};  // min_version > max_version: malformed
        BOOST_REQUIRE(send_all(c.get(), frame));
        auto payload = read_frame(c.get());
        if (payload && is_challenge(*payload)) payload = read_frame(c.get());  // the accept race
        BOOST_REQUIRE(payload.has_value());
        std::error_code ec;
        const native::message m = native::decode(*payload, ec);
        BOOST_REQUIRE(!ec);
        BOOST_REQUIRE(std::holds_alternative<native::error>(m));
        BOOST_TEST(static_cast<std::uint16_t>(std::get<native::error>(m).code) ==
                   quick::error_authentication_failed);
        BOOST_TEST(!read_frame(c.get()).has_value());  // closed
    }
    BOOST_TEST(s.stats().refused_auth == 2u);
    BOOST_TEST(s.pending() == 1u);
    s.stop();
}

BOOST_AUTO_TEST_CASE(server_coalesces_the_replies_of_one_read) {
    const authkey key = authkey::generate();
    sharer s(options_with(key));
    s.start_background();
    constexpr int n = 8;
    std::vector<unique_fd> memfds;
    std::vector<share_id> ids;
    for (int i = 0; i < n; ++i) {
        memfds.push_back(t::make_memfd(std::to_string(i)));
        ids.push_back(s.share(memfds.back().get()));
    }
    const share_id unknown(ids[0].address(), share_key::generate());
    {
        // The server thread sets up its ring and acceptor asynchronously: one fetch first.
        unique_fd warm = t::make_memfd("warm");
        BOOST_REQUIRE(fetch(s.share(warm.get()), dedicated(key)).size() == 1u);
        for (int i = 0; i < 400 && (s.pending() != 0 || s.stats().connections_open != 0); ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    const int before = open_fd_count();  // includes the server's n copies
    {
        unique_fd c = connect_to(ids[0].address());
        quick::request q;
        q.client_nonce = random_nonce();
        std::vector<std::byte> frame;
        quick::append_request_frame(frame, key, q);
        BOOST_REQUIRE(send_all(c.get(), frame));
        auto payload = read_frame(c.get());
        if (payload && is_challenge(*payload)) payload = read_frame(c.get());
        BOOST_REQUIRE(payload.has_value());
        std::error_code ec;
        const native::hello_ack ack = quick::decode_ack(key, q.client_nonce, *payload, ec);
        BOOST_REQUIRE(!ec);
        BOOST_TEST(ack.version == 2u);

        // n requests plus one for an unknown key, in one write: one pass on the server.
        std::vector<std::byte> requests;
        for (int i = 0; i <= n; ++i) {
            const std::size_t at = requests.size();
            requests.resize(at + wire::fetch_frame_size);
            wire::put_fetch(requests.data() + at, static_cast<std::uint64_t>(i + 1),
                            i < n ? ids[static_cast<std::size_t>(i)].key() : unknown.key());
        }
        BOOST_REQUIRE(send_all(c.get(), requests));
        received r = recv_batch(c.get());
        const auto frames = split_frames(r.bytes);
        // Every reply in one sendmsg: n descriptors in one batch, in frame order.
        BOOST_TEST(frames.size() == static_cast<std::size_t>(n + 1));
        BOOST_REQUIRE(r.fds.size() == static_cast<std::size_t>(n));
        BOOST_TEST(!r.truncated);
        std::size_t next_fd = 0;
        for (const auto& f : frames) {
            const native::message m = native::decode(f, ec);
            BOOST_REQUIRE(!ec);
            BOOST_REQUIRE(std::holds_alternative<native::reply>(m));
            const auto& part = std::get<native::reply>(m);
            if (part.request_id == static_cast<std::uint64_t>(n + 1)) {
                BOOST_TEST((part.status == native::reply_status::not_available));
                continue;
            }
            BOOST_TEST(part.part_fds == 1u);
            // Request i got share i.
            BOOST_TEST(t::read_contents(r.fds[next_fd++].get()) == std::to_string(part.request_id - 1));
        }
        r.fds.clear();
        std::vector<std::byte> confirm;
        native::append_frame(confirm, native::confirm{static_cast<std::uint64_t>(n + 1), {}});
        BOOST_REQUIRE(send_all(c.get(), confirm));
    }
    // Confirmed and closed: the server closes its copies; nothing leaks on this side.
    for (int i = 0; i < 400 && (s.pending() != 0 || s.stats().connections_open != 0); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    BOOST_TEST(s.pending() == 0u);
    BOOST_TEST(s.stats().delivered == static_cast<std::uint64_t>(n + 1));  // with the warm-up
    BOOST_TEST(open_fd_count() == before - n);
    s.stop();
}

// ---- the client against scripted servers ----

namespace {

// Accepts one connection, reads the QUICK, optionally sends a challenge first (the accept race),
// then answers QUICK_ACK (MAC made with @p ack_key) + one REPLY with a pipe's read end, in one
// sendmsg. Returns whether the QUICK verified.
bool scripted_quick_server(const fake_listener& l, const authkey& key, const authkey& ack_key,
                           int challenges) {
    unique_fd c = l.accept();
    if (!c) return false;
    for (int i = 0; i < challenges; ++i) {
        std::array<std::byte, detail::auth::nonce_size> nonce{};
        const auto challenge = detail::auth::make_challenge(nonce);
        write_frame(c.get(), challenge);
    }
    auto payload = read_frame(c.get());
    if (!payload) return false;
    std::error_code ec;
    const quick::request q = quick::decode_request(key, *payload, ec);
    if (ec || !q.first_fetch) return false;
    std::vector<std::byte> out;
    quick::append_ack_frame(out, ack_key, q.client_nonce, native::hello_ack{2, 4, 65536});
    const auto reply = one_fd_reply(q.first_fetch->request_id);
    out.insert(out.end(), reply.begin(), reply.end());
    auto [r, w] = t::make_pipe();
    const int fd = r.get();
    // A client that refused already may be gone (EPIPE); the QUICK verified either way.
    if (send_all(c.get(), out, std::span<const int>(&fd, 1))) (void)read_frame(c.get());  // CONFIRM or close
    return true;
}

}  // namespace

BOOST_AUTO_TEST_CASE(client_refuses_a_quick_ack_with_a_bad_mac_and_closes_the_descriptors) {
    const authkey key = authkey::generate();
    fake_listener l;
    const int before = open_fd_count();
    bool verified = false;
    std::thread server([&] { verified = scripted_quick_server(l, key, authkey::generate(), 0); });
    std::error_code ec;
    auto fds = fetch(share_id(l.path, share_key::generate()), ec, dedicated(key));
    server.join();
    BOOST_TEST(verified);
    BOOST_TEST((ec == errc::authentication_failed));
    BOOST_TEST(fds.empty());
    // The pipe end that came with the forged QUICK_ACK was closed, not handed over.
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(client_skips_exactly_one_leading_challenge) {
    const authkey key = authkey::generate();
    fake_listener l;
    const int before = open_fd_count();
    for (const int challenges : {1, 2}) {
        bool verified = false;
        std::thread server([&] { verified = scripted_quick_server(l, key, key, challenges); });
        std::error_code ec;
        auto fds = fetch(share_id(l.path, share_key::generate()), ec, dedicated(key));
        server.join();
        BOOST_TEST(verified);
        if (challenges == 1) {
            BOOST_TEST(!ec);
            BOOST_TEST(fds.size() == 1u);
        } else {
            BOOST_TEST((ec == errc::malformed_message));  // a second challenge is not the protocol
            BOOST_TEST(fds.empty());
        }
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(server_of_another_uid_gets_the_full_handshake) {
    const authkey key = authkey::generate();
    const uid_override foreign(::getuid() + 4242);  // what SO_PEERCRED "said"
    fake_listener l;
    const int before = open_fd_count();
    bool hello_seen = false;
    bool first_was_quick = true;
    std::thread server([&] {
        unique_fd c = l.accept();
        if (!c) return;
        // Nothing may arrive before the challenge: the client waits for it.
        detail::auth::handshake hs(detail::auth::handshake::role::server, key);
        if (auto first = hs.start()) write_frame(c.get(), *first);
        for (bool first = true; !hs.done(); first = false) {
            auto payload = read_frame(c.get());
            if (!payload) return;
            if (first) first_was_quick = quick::is_request(*payload);
            if (auto reply = hs.on_frame(*payload)) write_frame(c.get(), *reply);
        }
        if (hs.error()) return;
        auto hello = read_frame(c.get());
        auto fetch_frame = read_frame(c.get());
        if (!hello || !fetch_frame) return;
        hello_seen = native::classify_first_frame(*hello) == native::first_frame_kind::native_hello;
        std::error_code ec;
        const native::message m = native::decode(*fetch_frame, ec);
        if (ec || !std::holds_alternative<native::fetch>(m)) return;
        std::vector<std::byte> out;
        native::append_frame(out, native::hello_ack{1, 4, 65536});
        const auto reply = one_fd_reply(std::get<native::fetch>(m).request_id);
        auto [r, w] = t::make_pipe();
        const int fd = r.get();
        BOOST_REQUIRE(send_all(c.get(), out));
        BOOST_REQUIRE(send_all(c.get(), reply, std::span<const int>(&fd, 1)));
        (void)read_frame(c.get());
    });
    std::error_code ec;
    auto fds = fetch(share_id(l.path, share_key::generate()), ec, dedicated(key));
    server.join();
    BOOST_TEST(!first_was_quick);
    BOOST_TEST(hello_seen);
    BOOST_TEST(!ec);
    BOOST_TEST(fds.size() == 1u);
    fds.clear();
    BOOST_TEST(open_fd_count() == before);
}

STEWARD_CORO_TEST(foreign_uid_path_against_the_real_server) {
    // The full handshake still works against steward's own server (the path a server of another
    // uid gets); the server counts no refusal.
    const authkey key = authkey::generate();
    asio::local::stream_protocol::socket warm(ctx);
    const int before = open_fd_count();
    {
        const uid_override foreign(::getuid() + 4242);
        sharer s(ctx.get_executor(), options_with(key));
        unique_fd memfd = t::make_memfd("x");
        const share_id id = s.share(memfd.get());
        auto [ec, fds] = co_await async_fetch(ctx.get_executor(), id, use_tuple, dedicated(key));
        BOOST_TEST(!ec);
        BOOST_TEST(fds.size() == 1u);
        BOOST_TEST(s.stats().refused_auth == 0u);
        co_await s.async_stop(std::chrono::seconds(1), use_tuple);
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(real_server_of_another_uid_takes_the_full_handshake) {
    if (::geteuid() != 0) {
        BOOST_TEST_MESSAGE("not root: cannot run a server as another uid; test skipped");
        return;
    }
    // A server running as nobody that lets root in (allowed_uids): the client sees uid 65534 in
    // SO_PEERCRED, so it must authenticate with the full handshake (root can enter the 0700
    // directory of another user).
    const authkey key = authkey::generate();
    const int before = open_fd_count();
    auto id_pipe = t::make_pipe();
    auto go_pipe = t::make_pipe();
    unique_fd& id_r = id_pipe.first;
    unique_fd& id_w = id_pipe.second;
    unique_fd& go_r = go_pipe.first;
    unique_fd& go_w = go_pipe.second;
    auto child = t::fork_child([&, key] {
        id_r.reset();
        go_w.reset();
        if (::setgid(65534) != 0 || ::setuid(65534) != 0) return 40;
        sharer_options o = options_with(key);
        o.allowed_uids = {0};
        o.socket_base_dir = "/tmp";
        sharer s(o);
        s.start_background();
        unique_fd memfd = t::make_memfd("from nobody");
        const std::string text = s.share(memfd.get()).format() + "\n";
        if (::write(id_w.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) return 41;
        char c = 0;
        (void)::read(go_r.get(), &c, 1);  // the parent fetched; its CONFIRM may still be in flight
        for (int i = 0; i < 400 && s.stats().delivered == 0; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        const sharer_stats st = s.stats();
        s.stop();
        return st.delivered == 1 && st.refused_auth == 0 && st.refused_peer == 0 ? 0 : 42;
    });
    id_w.reset();
    go_r.reset();
    std::string text;
    char c = 0;
    while (::read(id_r.get(), &c, 1) == 1 && c != '\n') text.push_back(c);
    BOOST_REQUIRE(!text.empty());
    const share_id id = share_id::parse(text);
    uid_t server_uid = 0;
    {
        unique_fd probe = connect_to(id.address());
        ucred cred{};
        socklen_t len = sizeof cred;
        BOOST_REQUIRE(::getsockopt(probe.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0);
        server_uid = cred.uid;
    }
    BOOST_TEST(server_uid == 65534u);
    BOOST_TEST(!quick::peer_allows_quick(server_uid));
    std::error_code ec;
    auto fds = fetch(id, ec, dedicated(key));
    BOOST_TEST(!ec);
    BOOST_REQUIRE(fds.size() == 1u);
    BOOST_TEST(t::read_contents(fds[0].get()) == "from nobody");
    fds.clear();
    BOOST_REQUIRE(::write(go_w.get(), "g", 1) == 1);
    go_w.reset();
    id_r.reset();
    BOOST_TEST(child.wait() == 0);
    BOOST_TEST(open_fd_count() == before);
}

namespace {

// Shrinks @p l's backlog to one pending connection and fills it: non-blocking connects until the
// listener refuses one with EAGAIN. The connections that got in are returned.
std::vector<unique_fd> fill_backlog(const fake_listener& l) {
    BOOST_REQUIRE(::listen(l.fd.get(), 0) == 0);
    std::vector<unique_fd> fillers;
    for (;;) {
        unique_fd f(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
        BOOST_REQUIRE(f);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::memcpy(addr.sun_path, l.path.data(), l.path.size());
        if (::connect(f.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
            BOOST_REQUIRE(errno == EAGAIN);
            break;
        }
        fillers.push_back(std::move(f));
        BOOST_REQUIRE(fillers.size() < 64u);
    }
    BOOST_REQUIRE(!fillers.empty());
    return fillers;
}

}  // namespace

BOOST_AUTO_TEST_CASE(client_whose_connect_finds_the_backlog_full_waits_for_room_then_fetches) {
    const authkey key = authkey::generate();
    fake_listener l;
    std::vector<unique_fd> fillers = fill_backlog(l);
    const int held = static_cast<int>(fillers.size());
    const int before = open_fd_count();

    std::atomic<bool> done{false};
    std::error_code ec;
    std::vector<unique_fd> fds;
    std::thread client([&] {
        fds = fetch(share_id(l.path, share_key::generate()), ec, dedicated(key));
        done = true;
    });
    // The client's own connect found no room: it tries again after short pauses, it does not fail.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    BOOST_TEST(!done.load());
    // Room: the queued connections are taken, then the client's arrives and is served.
    for (std::size_t i = 0; i < fillers.size(); ++i) BOOST_TEST(static_cast<bool>(l.accept()));
    const bool verified = scripted_quick_server(l, key, key, 0);
    client.join();
    BOOST_TEST(verified);
    BOOST_TEST(!ec, ec.message());
    BOOST_REQUIRE(fds.size() == 1u);
    fds.clear();
    fillers.clear();
    BOOST_TEST(open_fd_count() == before - held);  // nothing left behind but the closed fillers
}

BOOST_AUTO_TEST_CASE(client_gives_up_on_a_backlog_that_stays_full_at_its_deadline_or_when_cancelled) {
    using namespace std::chrono_literals;
    const authkey key = authkey::generate();
    fake_listener l;
    const std::vector<unique_fd> fillers = fill_backlog(l);
    const int before = open_fd_count();
    const share_id id(l.path, share_key::generate());

    // Dedicated connection, blocking call: the handshake timeout bounds the wait for room.
    fetch_options o = dedicated(key);
    o.handshake_timeout = 200ms;
    std::error_code ec;
    auto fds = fetch(id, ec, o);
    BOOST_TEST((ec == errc::timed_out), ec.message());
    BOOST_TEST(fds.empty());

    // The pooled connection: the same bound.
    fetch_options pooled;
    pooled.key = key;
    pooled.handshake_timeout = 200ms;
    fds = fetch(id, ec, pooled);
    BOOST_TEST((ec == errc::timed_out), ec.message());
    BOOST_TEST(fds.empty());

    // A dedicated asynchronous fetch cancelled while it waits for room.
    t::run_coroutine([&](asio::io_context& ctx) -> asio::awaitable<void> {
        const asio::any_io_executor ex = ctx.get_executor();
        asio::cancellation_signal signal;
        asio::steady_timer timer(ex, 100ms);
        timer.async_wait([&](std::error_code) { signal.emit(asio::cancellation_type::terminal); });
        fetch_options long_wait = dedicated(key);
        long_wait.handshake_timeout = 30s;
        const auto t0 = std::chrono::steady_clock::now();
        auto [cec, cfds] =
            co_await async_fetch(ex, id, asio::bind_cancellation_slot(signal.slot(), use_tuple), long_wait);
        BOOST_TEST((cec == asio::error::operation_aborted), cec.message());
        BOOST_TEST(cfds.empty());
        BOOST_TEST((std::chrono::steady_clock::now() - t0 < t::slowed(std::chrono::seconds(5))));
    });
    BOOST_TEST(open_fd_count() == before);
}
