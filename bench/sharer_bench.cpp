// Sharer benchmarks: a process that holds one-shot descriptors (the server) and another process
// that fetches them (the client, which keeps the clock). The server prepares each round's
// descriptors (dup of /dev/null, or shares in steward's cache) before the clock starts; in the
// timed window it sends each one and closes its copy, the client receives each one and closes it.
//
// scenario fetch_pipelined   1 descriptor per id, one connection, many ids in flight
//   floor    a one-way stream: blocking sendmsg (1 byte + 1 fd) / recvmsg over a socketpair
//   steward  steward's native client pipelining fetches on one connection to steward's sharer
//            (version 2: the server writes the replies of one read in one sendmsg)
// scenario fetch_batch       253 descriptors per id (value: descriptors per second)
//   floor    blocking sendmsg of 1 byte + 253 fds per message / recvmsg
//   steward  one fetch of a 253-descriptor share at a time, pipelined
// scenario fetch_connect     a new connection per fetch (CPython's shape); latency per fetch
//   floor    connect + 16-byte key + recvmsg of the fd, server accept4/recv/sendmsg, no auth
//   steward  co_await steward::async_fetch with fetch_options::pooled = false: a new native
//            connection per fetch (quick connect: QUICK + FETCH in one write, QUICK_ACK + REPLY +
//            descriptor in one sendmsg, CONFIRM), against steward's sharer
//   steward_cpython_protocol  steward::async_fetch_cpython against steward's sharer: connect +
//            CPython's mutual HMAC handshake + pickled request + descriptor + 'A'
//   steward_blocking  steward::fetch(): the same native exchange as `steward`, blocking, on a
//            private io_context
//   floor_auth  the same plus CPython's handshake (mutual HMAC-SHA256 challenge/response, framed
//            request, 'A' acknowledgement): the eight-message exchange with blocking syscalls
//   (cpython: bench/python/sharer_fetch.py, run by bench/run)
// scenario fetch_warm        one fetch in flight at a time on a warm connection; latency per fetch
//   floor    send 16-byte key, server recv + sendmsg of the fd, recvmsg
//   steward  steward's native client, one fetch awaited at a time

#include "bench_common.hpp"

#if defined(STEWARD_BENCH_HAVE_SHARER)
#include <steward/authkey.hpp>
#include <steward/cpython_fetch.hpp>
#include <steward/fetch.hpp>
#include <steward/share_id.hpp>
#include <steward/sharer.hpp>
#endif

#include <asio/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <array>
#include <csignal>
#include <cstdint>

namespace {

struct key16 {
    std::uint64_t index = 0;
    std::uint64_t pad = 0;
};

// Sends one data byte carrying @p count descriptors from @p fds; blocking.
void send_fds(int sock, const int* fds, std::size_t count) {
    char byte = static_cast<char>(count % 256);
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(253 * sizeof(int))];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(count * sizeof(int));
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(count * sizeof(int));
    std::memcpy(CMSG_DATA(c), fds, count * sizeof(int));
    ssize_t n;
    do {
        n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    bench::check(n == 1, "sendmsg");
}

// Receives one data byte and its descriptors, closes them; returns how many came. Blocking.
std::size_t receive_and_close(int sock) {
    char byte = 0;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(253 * sizeof(int))];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n;
    do {
        n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    bench::check(n == 1, "recvmsg");
    std::size_t got = 0;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int fds[253];
        std::memcpy(fds, CMSG_DATA(c), count * sizeof(int));
        for (std::size_t i = 0; i < count; ++i) ::close(fds[i]);
        got += count;
    }
    bench::check(got > 0 && (msg.msg_flags & MSG_CTRUNC) == 0, "recvmsg: descriptors missing");
    return got;
}

// CPU time per unit of the result's value (per fetch, or per descriptor for fd/s), split by side.
void cpu_extras(bench::result& r, const bench::cpu_meter& client, double server_user, double server_sys) {
    const auto n = static_cast<double>(r.count_value());
    if (n <= 0) return;
    r.extra("client_user_ns", client.user * 1e9 / n);
    r.extra("client_sys_ns", client.sys * 1e9 / n);
    r.extra("server_user_ns", server_user * 1e9 / n);
    r.extra("server_sys_ns", server_sys * 1e9 / n);
}

std::vector<int> dup_many(int base, std::size_t count) {
    std::vector<int> fds(count);
    for (auto& fd : fds) {
        fd = ::fcntl(base, F_DUPFD_CLOEXEC, 0);
        bench::check(fd >= 0, "dup");
    }
    return fds;
}

// The floor of fetch_pipelined and fetch_batch: a one-way stream of messages carrying
// `fds_per_msg` descriptors each.
int floor_stream(const bench::args& a, std::size_t fds_per_msg, std::size_t msgs_per_round) {
    int sv[2];
    bench::check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    const int base = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    bench::channel ch = bench::channel::make();
    const pid_t server = bench::fork_child([&] {
        ch.in_child();
        ::close(sv[1]);
        bench::cpu_meter serve;
        for (std::uint32_t msgs = 0; ch.receive_from_parent(msgs) && msgs > 0;) {
            serve.end();
            std::vector<int> fds = dup_many(base, msgs * fds_per_msg);
            ch.send_to_parent('r');
            serve.begin();
            for (std::size_t m = 0; m < msgs; ++m) {
                send_fds(sv[0], fds.data() + m * fds_per_msg, fds_per_msg);
                for (std::size_t i = 0; i < fds_per_msg; ++i) ::close(fds[m * fds_per_msg + i]);
            }
        }
        serve.end();
        ch.send_to_parent(serve.user);
        ch.send_to_parent(serve.sys);
    });
    ch.in_parent();
    ::close(sv[0]);
    const std::size_t total_msgs = std::max<std::size_t>(1, a.n / fds_per_msg);
    double seconds = 0;
    bench::cpu_meter client_cpu;
    std::size_t received = 0;
    for (std::size_t done = 0; done < total_msgs;) {
        const auto msgs = static_cast<std::uint32_t>(std::min(msgs_per_round, total_msgs - done));
        ch.send_to_child(msgs);
        (void)ch.receive_from_child<char>();
        const auto t0 = bench::clock::now();
        client_cpu.begin();
        for (std::uint32_t m = 0; m < msgs; ++m) received += receive_and_close(sv[1]);
        seconds += bench::seconds_since(t0);
        client_cpu.end();
        done += msgs;
    }
    ch.send_to_child(std::uint32_t{0});
    const auto server_user = ch.receive_from_child<double>();
    const auto server_sys = ch.receive_from_child<double>();
    const int status = bench::wait_child(server);
    bench::result r(a, fds_per_msg == 1 ? "fetch/s" : "fd/s", true);
    r.value(static_cast<double>(received) / seconds);
    r.count(received);
    r.seconds(seconds);
    cpu_extras(r, client_cpu, server_user, server_sys);
    r.print();
    return status;
}

std::string temp_socket_path() {
    char dir[] = "/tmp/stwbench-XXXXXX";
    bench::check(::mkdtemp(dir) != nullptr, "mkdtemp");
    return std::string(dir) + "/s";
}

sockaddr_un address_of(const std::string& path) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    return addr;
}

// The floor of fetch_connect: connect + key + fd per fetch, no authentication.
int floor_connect(const bench::args& a, std::size_t per_round) {
    const std::string path = temp_socket_path();
    const sockaddr_un addr = address_of(path);
    const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bench::check(listener >= 0, "socket");
    bench::check(::bind(listener, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0, "bind");
    bench::check(::listen(listener, 128) == 0, "listen");
    const int base = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    bench::channel ch = bench::channel::make();
    const pid_t server = bench::fork_child([&] {
        ch.in_child();
        bench::cpu_meter serve;
        for (std::uint32_t count = 0; ch.receive_from_parent(count) && count > 0;) {
            serve.end();
            std::vector<int> fds = dup_many(base, count);
            ch.send_to_parent('r');
            serve.begin();
            for (std::uint32_t i = 0; i < count; ++i) {
                const int conn = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
                bench::check(conn >= 0, "accept4");
                key16 key;
                bench::check(::recv(conn, &key, sizeof key, MSG_WAITALL) == sizeof key, "recv key");
                bench::check(key.index < count && fds[key.index] >= 0, "bad key");
                send_fds(conn, &fds[key.index], 1);
                ::close(fds[key.index]);
                fds[key.index] = -1;
                ::close(conn);
            }
        }
        serve.end();
        ch.send_to_parent(serve.user);
        ch.send_to_parent(serve.sys);
    });
    ch.in_parent();
    ::close(listener);
    std::vector<double> latencies;
    latencies.reserve(a.n);
    double seconds = 0;
    bench::cpu_meter client_cpu;
    for (std::size_t done = 0; done < a.n;) {
        const auto count = static_cast<std::uint32_t>(std::min(per_round, a.n - done));
        ch.send_to_child(count);
        (void)ch.receive_from_child<char>();
        const auto t0 = bench::clock::now();
        client_cpu.begin();
        for (std::uint32_t i = 0; i < count; ++i) {
            const auto f0 = bench::clock::now();
            const int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            bench::check(s >= 0, "socket");
            bench::check(::connect(s, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0, "connect");
            const key16 key{i, 0};
            bench::check(::send(s, &key, sizeof key, MSG_NOSIGNAL) == sizeof key, "send key");
            receive_and_close(s);
            ::close(s);
            latencies.push_back(std::chrono::duration<double, std::nano>(bench::clock::now() - f0).count());
        }
        seconds += bench::seconds_since(t0);
        client_cpu.end();
        done += count;
    }
    ch.send_to_child(std::uint32_t{0});
    const auto server_user = ch.receive_from_child<double>();
    const auto server_sys = ch.receive_from_child<double>();
    const int status = bench::wait_child(server);
    ::unlink(path.c_str());
    ::rmdir(path.substr(0, path.size() - 2).c_str());
    bench::result r(a, "fetch/s", true);
    r.value(static_cast<double>(a.n) / seconds);
    r.count(a.n);
    r.seconds(seconds);
    r.latencies_ns(std::move(latencies));
    cpu_extras(r, client_cpu, server_user, server_sys);
    r.print();
    return status;
}

// ---- floor with CPython's authentication: the same eight-message exchange as a CPython-protocol
// fetch (mutual HMAC-SHA256 challenge/response, request, descriptor, 'A' acknowledgement), written
// with blocking syscalls and OpenSSL's one-shot HMAC. It shows what the protocol itself costs.

void send_frame(int sock, const void* payload, std::size_t size) {
    unsigned char buf[512];
    const auto n = static_cast<std::uint32_t>(size);
    buf[0] = static_cast<unsigned char>(n >> 24);
    buf[1] = static_cast<unsigned char>(n >> 16);
    buf[2] = static_cast<unsigned char>(n >> 8);
    buf[3] = static_cast<unsigned char>(n);
    std::memcpy(buf + 4, payload, size);
    bench::check(::send(sock, buf, size + 4, MSG_NOSIGNAL) == static_cast<ssize_t>(size + 4), "send frame");
}

// Reads frames off a socket, keeping what a recv returned beyond the current frame (the client
// sends its #WELCOME# and its request back to back).
struct frame_reader {
    int sock;
    unsigned char buf[1024];
    std::size_t have = 0;

    std::size_t next(unsigned char* out, std::size_t cap) {
        auto frame_end = [&]() -> std::size_t {
            if (have < 4) return 0;
            const std::size_t size = (std::size_t{buf[0]} << 24) | (std::size_t{buf[1]} << 16) |
                                     (std::size_t{buf[2]} << 8) | buf[3];
            bench::check(size <= cap && size + 4 <= sizeof buf, "frame too large");
            return have >= size + 4 ? size + 4 : 0;
        };
        std::size_t end = 0;
        while ((end = frame_end()) == 0) {
            const ssize_t n = ::recv(sock, buf + have, sizeof buf - have, 0);
            bench::check(n > 0, "recv frame");
            have += static_cast<std::size_t>(n);
        }
        std::memcpy(out, buf + 4, end - 4);
        std::memmove(buf, buf + end, have - end);
        have -= end;
        return end - 4;
    }
};

constexpr char sha_prefix[] = "{sha256}";
constexpr std::size_t sha_prefix_size = sizeof sha_prefix - 1;

void deliver_challenge(frame_reader& in, const unsigned char* key) {
    const int sock = in.sock;
    unsigned char msg[11 + sha_prefix_size + 40];
    std::copy_n("#CHALLENGE#", 11, msg);
    std::copy_n(sha_prefix, sha_prefix_size, msg + 11);
    bench::check(::getrandom(msg + 11 + sha_prefix_size, 40, 0) == 40, "getrandom");
    send_frame(sock, msg, sizeof msg);
    unsigned char answer[256];
    const std::size_t n = in.next(answer, sizeof answer);
    unsigned char expected[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    HMAC(EVP_sha256(), key, 32, msg + 11, sizeof msg - 11, expected, &len);
    const bool ok = n == sha_prefix_size + len && CRYPTO_memcmp(answer + sha_prefix_size, expected, len) == 0;
    bench::check(ok, "authentication failed");
    send_frame(sock, "#WELCOME#", 9);
}

void answer_challenge(frame_reader& in, const unsigned char* key) {
    const int sock = in.sock;
    unsigned char msg[256];
    const std::size_t n = in.next(msg, sizeof msg);
    bench::check(n > 11 + sha_prefix_size && std::memcmp(msg, "#CHALLENGE#", 11) == 0, "bad challenge");
    unsigned char answer[sha_prefix_size + EVP_MAX_MD_SIZE];
    std::memcpy(answer, sha_prefix, sha_prefix_size);
    unsigned int len = 0;
    HMAC(EVP_sha256(), key, 32, msg + 11, n - 11, answer + sha_prefix_size, &len);
    send_frame(sock, answer, sha_prefix_size + len);
    unsigned char welcome[64];
    const std::size_t w = in.next(welcome, sizeof welcome);
    bench::check(w == 9 && std::memcmp(welcome, "#WELCOME#", 9) == 0, "not welcomed");
}

int floor_connect_auth(const bench::args& a, std::size_t per_round) {
    unsigned char key[32];
    bench::check(::getrandom(key, sizeof key, 0) == sizeof key, "getrandom");
    const std::string path = temp_socket_path();
    const sockaddr_un addr = address_of(path);
    const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bench::check(listener >= 0, "socket");
    bench::check(::bind(listener, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0, "bind");
    bench::check(::listen(listener, 128) == 0, "listen");
    const int base = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    bench::channel ch = bench::channel::make();
    const pid_t server = bench::fork_child([&] {
        ch.in_child();
        bench::cpu_meter serve;
        for (std::uint32_t count = 0; ch.receive_from_parent(count) && count > 0;) {
            serve.end();
            std::vector<int> fds = dup_many(base, count);
            ch.send_to_parent('r');
            serve.begin();
            for (std::uint32_t i = 0; i < count; ++i) {
                const int conn = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
                bench::check(conn >= 0, "accept4");
                frame_reader in{conn, {}, 0};
                deliver_challenge(in, key);
                answer_challenge(in, key);
                key16 k;
                bench::check(in.next(reinterpret_cast<unsigned char*>(&k), sizeof k) == sizeof k, "request");
                bench::check(in.have == 0, "unexpected bytes after the request");
                bench::check(k.index < count && fds[k.index] >= 0, "bad key");
                send_fds(conn, &fds[k.index], 1);
                char ack = 0;
                (void)::recv(conn, &ack, 1, 0);  // 'A' or end of file, as a 3.14-compatible server
                ::close(fds[k.index]);
                fds[k.index] = -1;
                ::close(conn);
            }
        }
        serve.end();
        ch.send_to_parent(serve.user);
        ch.send_to_parent(serve.sys);
    });
    ch.in_parent();
    ::close(listener);
    std::vector<double> latencies;
    latencies.reserve(a.n);
    double seconds = 0;
    bench::cpu_meter client_cpu;
    for (std::size_t done = 0; done < a.n;) {
        const auto count = static_cast<std::uint32_t>(std::min(per_round, a.n - done));
        ch.send_to_child(count);
        (void)ch.receive_from_child<char>();
        const auto t0 = bench::clock::now();
        client_cpu.begin();
        for (std::uint32_t i = 0; i < count; ++i) {
            const auto f0 = bench::clock::now();
            const int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            bench::check(s >= 0, "socket");
            bench::check(::connect(s, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0, "connect");
            frame_reader in{s, {}, 0};
            answer_challenge(in, key);
            deliver_challenge(in, key);
            const key16 k{i, 0};
            send_frame(s, &k, sizeof k);
            receive_and_close(s);
            (void)::send(s, "A", 1, MSG_NOSIGNAL);
            ::close(s);
            latencies.push_back(std::chrono::duration<double, std::nano>(bench::clock::now() - f0).count());
        }
        seconds += bench::seconds_since(t0);
        client_cpu.end();
        done += count;
    }
    ch.send_to_child(std::uint32_t{0});
    const auto server_user = ch.receive_from_child<double>();
    const auto server_sys = ch.receive_from_child<double>();
    const int status = bench::wait_child(server);
    ::unlink(path.c_str());
    ::rmdir(path.substr(0, path.size() - 2).c_str());
    bench::result r(a, "fetch/s", true);
    r.value(static_cast<double>(a.n) / seconds);
    r.count(a.n);
    r.seconds(seconds);
    r.latencies_ns(std::move(latencies));
    cpu_extras(r, client_cpu, server_user, server_sys);
    r.print();
    return status;
}

// The floor of fetch_warm: one request at a time on a persistent connection.
int floor_warm(const bench::args& a, std::size_t per_round) {
    int sv[2];
    bench::check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    const int base = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    bench::channel ch = bench::channel::make();
    const pid_t server = bench::fork_child([&] {
        ch.in_child();
        ::close(sv[1]);
        bench::cpu_meter serve;
        for (std::uint32_t count = 0; ch.receive_from_parent(count) && count > 0;) {
            serve.end();
            std::vector<int> fds = dup_many(base, count);
            ch.send_to_parent('r');
            serve.begin();
            for (std::uint32_t i = 0; i < count; ++i) {
                key16 key;
                bench::check(::recv(sv[0], &key, sizeof key, MSG_WAITALL) == sizeof key, "recv key");
                bench::check(key.index < count && fds[key.index] >= 0, "bad key");
                send_fds(sv[0], &fds[key.index], 1);
                ::close(fds[key.index]);
                fds[key.index] = -1;
            }
        }
        serve.end();
        ch.send_to_parent(serve.user);
        ch.send_to_parent(serve.sys);
    });
    ch.in_parent();
    ::close(sv[0]);
    std::vector<double> latencies;
    latencies.reserve(a.n);
    double seconds = 0;
    bench::cpu_meter client_cpu;
    for (std::size_t done = 0; done < a.n;) {
        const auto count = static_cast<std::uint32_t>(std::min(per_round, a.n - done));
        ch.send_to_child(count);
        (void)ch.receive_from_child<char>();
        const auto t0 = bench::clock::now();
        client_cpu.begin();
        for (std::uint32_t i = 0; i < count; ++i) {
            const auto f0 = bench::clock::now();
            const key16 key{i, 0};
            bench::check(::send(sv[1], &key, sizeof key, MSG_NOSIGNAL) == sizeof key, "send key");
            receive_and_close(sv[1]);
            latencies.push_back(std::chrono::duration<double, std::nano>(bench::clock::now() - f0).count());
        }
        seconds += bench::seconds_since(t0);
        client_cpu.end();
        done += count;
    }
    ch.send_to_child(std::uint32_t{0});
    const auto server_user = ch.receive_from_child<double>();
    const auto server_sys = ch.receive_from_child<double>();
    const int status = bench::wait_child(server);
    bench::result r(a, "fetch/s", true);
    r.value(static_cast<double>(a.n) / seconds);
    r.count(a.n);
    r.seconds(seconds);
    r.latencies_ns(std::move(latencies));
    cpu_extras(r, client_cpu, server_user, server_sys);
    r.print();
    return status;
}

#if defined(STEWARD_BENCH_HAVE_SHARER)
// ---- steward: a sharer in a child process, the native client (or CPython's protocol) here ----

// The child: a steward::sharer running in its background thread. Per round it shares `count`
// ids of `fds_per_id` descriptors each (dups of /dev/null, made by share()), sends the keys to
// the parent and waits for the next round (0 ends it).
pid_t start_steward_server(bench::channel& ch, std::size_t fds_per_id, const steward::authkey& key,
                           std::string& address) {
    const pid_t pid = bench::fork_child([&] {
        ch.in_child();
        const int base = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        steward::sharer_options options;
        options.key = key;
        options.max_pending_shares = 1u << 20;
        steward::sharer server(options);
        server.start_background();
        bool first = true;
        bench::cpu_meter serve;
        for (std::uint32_t count = 0; ch.receive_from_parent(count) && count > 0;) {
            serve.end();
            const std::vector<int> fds(fds_per_id, base);
            std::vector<steward::share_key> keys;
            keys.reserve(count);
            for (std::uint32_t i = 0; i < count; ++i) keys.push_back(server.share(fds).key());
            if (first) {
                const std::string addr = server.address();
                const auto len = static_cast<std::uint32_t>(addr.size());
                bench::write_all(ch.child_write, &len, sizeof len);
                bench::write_all(ch.child_write, addr.data(), addr.size());
                first = false;
            }
            bench::write_all(ch.child_write, keys.data(), keys.size() * sizeof(steward::share_key));
            serve.begin();
        }
        serve.end();
        server.stop(std::chrono::seconds(5));
        ch.send_to_parent(serve.user);
        ch.send_to_parent(serve.sys);
    });
    ch.in_parent();
    (void)address;
    return pid;
}

// Asks the server child for `count` fresh ids.
std::vector<steward::share_id> next_round(bench::channel& ch, std::uint32_t count, std::string& address) {
    ch.send_to_child(count);
    if (address.empty()) {
        const auto len = ch.receive_from_child<std::uint32_t>();
        address.resize(len);
        if (!bench::read_all(ch.parent_read, address.data(), len))
            throw std::runtime_error("server went away");
    }
    std::vector<steward::share_key> keys(count);
    if (!bench::read_all(ch.parent_read, keys.data(), keys.size() * sizeof(steward::share_key)))
        throw std::runtime_error("server went away");
    std::vector<steward::share_id> ids;
    ids.reserve(count);
    for (const auto& k : keys) ids.emplace_back(address, k);
    return ids;
}

enum class steward_shape {
    pipelined,        // `in_flight` fetches outstanding on the pooled connection
    sequential,       // one fetch awaited at a time on the pooled (warm) connection
    cpython_connect,  // async_fetch_cpython: a new connection + handshake + pickle per fetch
    dedicated,        // async_fetch with pooled = false: a new native connection (quick connect) per fetch
    blocking_native,  // steward::fetch(): private io_context, a new native connection per fetch
};

int steward_fetch(const bench::args& a, std::size_t fds_per_id, std::size_t per_round, steward_shape shape,
                  std::size_t in_flight) {
    const steward::authkey key = steward::authkey::generate();
    bench::channel ch = bench::channel::make();
    std::string address;
    const pid_t server = start_steward_server(ch, fds_per_id, key, address);
    asio::io_context ctx(1);
    const asio::any_io_executor ex = ctx.get_executor();
    steward::fetch_options options;
    options.key = key;
    steward::fetch_options dedicated_options = options;
    dedicated_options.pooled = false;
    const std::size_t total_ids = std::max<std::size_t>(1, a.n / fds_per_id);
    std::vector<double> latencies;
    const bool record_latency = shape != steward_shape::pipelined;
    if (record_latency) latencies.reserve(total_ids);
    double seconds = 0;
    bench::cpu_meter client_cpu;
    std::size_t received = 0;
    std::exception_ptr error;

    // Fetches `ids` with the shape asked for; returns the seconds taken.
    auto fetch_all = [&](const std::vector<steward::share_id>& ids, bool timed) -> asio::awaitable<void> {
        std::size_t next = 0;
        std::size_t running = in_flight;
        const auto t0 = bench::clock::now();
        if (timed) client_cpu.begin();
        auto worker = [&]() -> asio::awaitable<void> {
            while (next < ids.size()) {
                const steward::share_id& id = ids[next++];
                const auto f0 = record_latency ? bench::clock::now() : bench::clock::time_point{};
                std::vector<steward::unique_fd> fds;
                if (shape == steward_shape::cpython_connect)
                    fds =
                        co_await steward::async_fetch_cpython(ex, id.to_cpython(), key, asio::use_awaitable);
                else if (shape == steward_shape::blocking_native)
                    fds = steward::fetch(id, options);
                else if (shape == steward_shape::dedicated)
                    fds = co_await steward::async_fetch(ex, id, asio::use_awaitable, dedicated_options);
                else
                    fds = co_await steward::async_fetch(ex, id, asio::use_awaitable, options);
                if (timed && record_latency)
                    latencies.push_back(
                        std::chrono::duration<double, std::nano>(bench::clock::now() - f0).count());
                if (timed) received += fds.size();
            }
        };
        if (shape == steward_shape::pipelined) {
            // `in_flight` workers on this one coroutine chain: all use the pooled connection.
            auto done = std::make_shared<asio::steady_timer>(ctx, asio::steady_timer::time_point::max());
            for (std::size_t w = 0; w < in_flight; ++w)
                asio::co_spawn(ctx, worker(), [&, done](const std::exception_ptr& e) {
                    if (e && !error) error = e;
                    if (--running == 0) done->cancel();
                });
            co_await done->async_wait(asio::as_tuple(asio::use_awaitable));
        } else {
            co_await worker();
        }
        if (timed) seconds += bench::seconds_since(t0);
        if (timed) client_cpu.end();
    };

    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
            // Warm-up (untimed): connects and authenticates the pooled connection.
            co_await fetch_all(next_round(ch, 2, address), false);
            for (std::size_t done = 0; done < total_ids && !error;) {
                const auto count = static_cast<std::uint32_t>(std::min(per_round, total_ids - done));
                const auto ids = next_round(ch, count, address);
                co_await fetch_all(ids, true);
                done += count;
            }
        },
        [&](const std::exception_ptr& e) {
            if (e && !error) error = e;
        });
    ctx.run();
    ch.send_to_child(std::uint32_t{0});
    const auto server_user = ch.receive_from_child<double>();
    const auto server_sys = ch.receive_from_child<double>();
    const int status = bench::wait_child(server);
    if (error) std::rethrow_exception(error);
    bench::result r(a, fds_per_id == 1 ? "fetch/s" : "fd/s", true);
    r.value(static_cast<double>(received) / seconds);
    r.count(received);
    r.seconds(seconds);
    if (shape == steward_shape::pipelined) r.extra("in_flight", static_cast<double>(in_flight));
    if (record_latency) r.latencies_ns(std::move(latencies));
    cpu_extras(r, client_cpu, server_user, server_sys);
    r.print();
    return status;
}
#endif

}  // namespace

#if defined(STEWARD_BENCH_HAVE_SHARER)
#define STEWARD_FETCH(...) return steward_fetch(__VA_ARGS__)
#else
#define STEWARD_FETCH(...) \
    return bench::not_measured(a, "steward's sharer server / native fetch client not in the tree yet")
#endif

int main(int argc, char** argv) {
    bench::args a = bench::parse_args(argc, argv, 0);
    (void)std::signal(SIGPIPE, SIG_IGN);
    bench::raise_nofile_limit();
    try {
        const std::string& s = a.scenario;
        const std::string& v = a.variant;
        const std::size_t per_round = a.get_size("per-round", 5000);
        if (s == "fetch_pipelined") {
            if (a.n == 0) a.n = 200000;
            if (v == "floor") return floor_stream(a, 1, per_round);
            if (v == "steward")
                STEWARD_FETCH(a, 1, per_round, steward_shape::pipelined, a.get_size("in-flight", 64));
        } else if (s == "fetch_batch") {
            if (a.n == 0) a.n = std::size_t{253} * 2000;
            if (v == "floor") return floor_stream(a, 253, std::max<std::size_t>(1, per_round / 100));
            if (v == "steward")
                STEWARD_FETCH(a, 253, std::max<std::size_t>(1, per_round / 100), steward_shape::pipelined,
                              a.get_size("in-flight", 4));
        } else if (s == "fetch_connect") {
            if (a.n == 0) a.n = 20000;
            if (v == "floor") return floor_connect(a, per_round);
            if (v == "floor_auth") return floor_connect_auth(a, per_round);
            if (v == "steward") STEWARD_FETCH(a, 1, per_round, steward_shape::dedicated, 1);
            if (v == "steward_cpython_protocol")
                STEWARD_FETCH(a, 1, per_round, steward_shape::cpython_connect, 1);
            if (v == "steward_blocking") STEWARD_FETCH(a, 1, per_round, steward_shape::blocking_native, 1);
        } else if (s == "fetch_warm") {
            if (a.n == 0) a.n = 50000;
            if (v == "floor") return floor_warm(a, per_round);
            if (v == "steward") STEWARD_FETCH(a, 1, per_round, steward_shape::sequential, 1);
        }
        return bench::failed(a, "unknown scenario or variant");
    } catch (const std::exception& e) {
        return bench::failed(a, e.what());
    }
}
