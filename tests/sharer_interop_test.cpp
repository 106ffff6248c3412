#define BOOST_TEST_MODULE sharer_interop_test
#include "support/test_support.hpp"

#include "support/fd_test_support.hpp"
#include "support/python3.hpp"

#include <steward/authkey.hpp>
#include <steward/error.hpp>
#include <steward/sharer.hpp>

#include <string>
#include <thread>

// CPython's own multiprocessing.resource_sharer client code (DupFd.detach -> Client(address,
// authkey) -> send((key, pid)) -> reduction.recv_handle) fetching from steward's server.

using namespace steward;
using steward::test::open_fd_count;
namespace t = steward::test;

namespace {

// Python source that fetches the share (address, key) with resource_sharer's client path and
// prints what it got; @p body runs with `fd` bound (or prints "refused" on EOF).
std::string python_fetch(const share_id& id, const std::string& body,
                         const std::string& key_expr = "bytes.fromhex(os.environ['STEWARD_AUTHKEY'])") {
    const cpython_ident ident = id.to_cpython();
    return "import os, sys, multiprocessing\n"
           "from multiprocessing import resource_sharer, AuthenticationError\n"
           "multiprocessing.current_process().authkey = " +
           key_expr +
           "\n"
           "d = resource_sharer.DupFd.__new__(resource_sharer.DupFd)\n"
           "d._id = (" +
           "bytes.fromhex('" +
           t::to_hex(std::as_bytes(std::span(ident.address.data(), ident.address.size()))) + "').decode(), " +
           ident.key +
           ")\n"
           "try:\n"
           "    fd = d.detach()\n"
           "except EOFError:\n"
           "    print('refused'); sys.exit(0)\n"
           "except AuthenticationError:\n"
           "    print('auth-failed'); sys.exit(0)\n" +
           body;
}

void wait_pending_zero(sharer& s) {
    for (int i = 0; i < 400 && s.pending() != 0; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
}

}  // namespace

BOOST_AUTO_TEST_CASE(cpython_client_fetches_memfd_and_socket_from_steward,
                     *boost::unit_test::precondition(t::io_uring_available) *
                         boost::unit_test::precondition(t::python3_available)) {
    BOOST_REQUIRE(authkey::family().set_environment());
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        unique_fd memfd = t::make_memfd("made in C++");
        const share_id id = s.share(memfd.get());

        // 128-bit key: CPython pickles it as LONG1; 3.11 answers our {sha256} challenge with MD5.
        const std::string out = t::run_python(python_fetch(id, "print(os.pread(fd, 100, 0).decode())\n"));
        BOOST_TEST(out == "made in C++");
        wait_pending_zero(s);
        BOOST_TEST(s.pending() == 0u);
        BOOST_TEST(s.stats().delivered == 1u);

        // The same key again: CPython's client sees the connection close (EOFError).
        BOOST_TEST(t::run_python(python_fetch(id, "print('got', fd)\n")) == "refused");

        // A socket: python answers on it.
        auto mine_theirs_pair = t::socket_pair();
        unique_fd mine = std::move(mine_theirs_pair.first);
        unique_fd theirs = std::move(mine_theirs_pair.second);
        const share_id sock_id = s.share(theirs.get());
        theirs.reset();
        const std::string out2 = t::run_python(python_fetch(sock_id,
                                                            "import socket\n"
                                                            "s = socket.socket(fileno=fd)\n"
                                                            "s.sendall(b'hello from python')\n"
                                                            "print('sent')\n"));
        BOOST_TEST(out2 == "sent");
        char buf[32] = {};
        BOOST_TEST(::read(mine.get(), buf, sizeof buf) == 17);
        BOOST_TEST(std::string(buf, 17) == "hello from python");

        // Another family key: refused by the handshake; the server keeps serving.
        unique_fd other = t::make_memfd("not for them");
        const share_id other_id = s.share(other.get());
        BOOST_TEST(t::run_python(python_fetch(other_id, "print('got', fd)\n", "os.urandom(32)")) ==
                   "auth-failed");
        BOOST_TEST(s.stats().refused_auth == 1u);
        BOOST_TEST(s.pending() == 1u);
        BOOST_TEST(t::run_python(python_fetch(other_id, "print(os.pread(fd, 100, 0).decode())\n")) ==
                   "not for them");
    }
    BOOST_TEST(open_fd_count() == before);
}

BOOST_AUTO_TEST_CASE(cpython_pid_restriction_uses_the_kernels_pid,
                     *boost::unit_test::precondition(t::io_uring_available) *
                         boost::unit_test::precondition(t::python3_available)) {
    BOOST_REQUIRE(authkey::family().set_environment());
    const int before = open_fd_count();
    {
        sharer s;
        s.start_background();
        unique_fd memfd = t::make_memfd("pid bound");
        share_options only_me;
        only_me.allowed_pid = ::getpid();  // python is another process, whatever pid it claims
        const share_id id = s.share(memfd.get(), only_me);
        BOOST_TEST(t::run_python(python_fetch(id, "print('got', fd)\n")) == "refused");
        BOOST_TEST(s.pending() == 1u);
        BOOST_TEST(s.revoke(id));
    }
    BOOST_TEST(open_fd_count() == before);
}
