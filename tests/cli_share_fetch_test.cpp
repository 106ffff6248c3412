#define BOOST_TEST_MODULE cli_share_fetch_test
#include "support/cli_process.hpp"
#include "support/python3.hpp"
#include "support/test_support.hpp"

#include <steward/authkey.hpp>
#include <steward/share_id.hpp>
#include <steward/unique_fd.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

using steward::test::cli_process;
using steward::test::run_cli;
using steward::test::runtime_dir;
using namespace std::chrono_literals;

namespace {

const auto needs_io_uring = boost::unit_test::precondition(steward::test::io_uring_available);

// Each test decides which key its children see; one inherited from the caller would blur that.
struct no_inherited_key {
    no_inherited_key() { ::unsetenv("STEWARD_AUTHKEY"); }
};

}  // namespace

BOOST_TEST_GLOBAL_FIXTURE(no_inherited_key);

namespace {

std::vector<std::string> split(const std::string& line, char sep = ' ') {
    std::vector<std::string> fields;
    std::string field;
    std::istringstream in(line);
    while (std::getline(in, field, sep)) fields.push_back(field);
    return fields;
}

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> lines = split(text, '\n');
    if (!lines.empty() && lines.back().empty()) lines.pop_back();
    return lines;
}

// One `ADDRESS KEY_DECIMAL SHARE_ID_TEXT` line of `steward share`, checked field by field.
struct share_line {
    std::string address;
    std::string key_decimal;
    std::string id_text;
    steward::share_id id;

    explicit share_line(const std::string& line) {
        const std::vector<std::string> fields = split(line);
        BOOST_REQUIRE_MESSAGE(fields.size() == 3, "expected 3 fields in '" << line << "'");
        address = fields[0];
        key_decimal = fields[1];
        id_text = fields[2];
        std::error_code ec;
        id = steward::share_id::parse(id_text, ec);
        BOOST_REQUIRE_MESSAGE(!ec, "share id does not parse: " << id_text << ": " << ec.message());
    }
};

// The test's family key and private runtime directory, as the CLI's environment.
struct family {
    steward::authkey key = steward::authkey::generate();
    runtime_dir dir;
    [[nodiscard]] std::vector<std::string> env() const {
        std::vector<std::string> e = dir.env();
        e.push_back("STEWARD_AUTHKEY=" + key.to_hex());
        return e;
    }
};

std::string temp_file(const std::string& dir, const std::string& name, const std::string& contents) {
    const std::string path = dir + "/" + name;
    std::ofstream(path, std::ios::binary) << contents;
    return path;
}

bool exists(const std::string& path) {
    struct stat st {};
    return ::lstat(path.c_str(), &st) == 0;
}

std::string parent_dir(const std::string& path) {
    return path.substr(0, path.rfind('/'));
}

}  // namespace

BOOST_AUTO_TEST_CASE(share_prints_address_key_and_id_then_sigterm_cleans_up, *needs_io_uring) {
    const int fds_before = steward::test::open_fd_count();
    {
        family fam;
        runtime_dir files;
        const std::string a = temp_file(files.path, "a", "A");
        const std::string b = temp_file(files.path, "b", "B");
        cli_process share({"share", a, b}, fam.env());
        const share_line first(share.read_line());
        const share_line second(share.read_line());
        for (const share_line* l : {&first, &second}) {
            BOOST_TEST(l->id.address() == l->address);
            BOOST_TEST(l->id.key().to_decimal() == l->key_decimal);
            BOOST_TEST((steward::share_key::from_decimal(l->key_decimal) == l->id.key()));
            BOOST_TEST(l->id.format() == l->id_text);
            BOOST_TEST(l->address.starts_with(fam.dir.path + "/"), "socket under the private runtime dir");
        }
        BOOST_TEST(first.address == second.address);
        BOOST_TEST((first.id.key() != second.id.key()));
        struct stat st {};
        BOOST_REQUIRE(::stat(first.address.c_str(), &st) == 0);
        BOOST_TEST(S_ISSOCK(st.st_mode));

        share.send_signal(SIGTERM);
        const auto r = share.finish(10s);
        BOOST_TEST(r.status == 128 + SIGTERM);
        BOOST_TEST(r.err.find("2 of 2 shares were not fetched") != std::string::npos, r.err);
        BOOST_TEST(!exists(first.address));
        BOOST_TEST(!exists(parent_dir(first.address)), "socket directory removed");
        BOOST_TEST(fam.dir.empty());
        ::unlink(a.c_str());
        ::unlink(b.c_str());
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(sigint_stops_share_with_130, *needs_io_uring) {
    family fam;
    cli_process share({"share", "/etc/hostname"}, fam.env());
    const share_line line(share.read_line());
    share.send_signal(SIGINT);
    const auto r = share.finish(10s);
    BOOST_TEST(r.status == 128 + SIGINT);
    BOOST_TEST(!exists(parent_dir(line.address)));
    BOOST_TEST(fam.dir.empty());
}

BOOST_AUTO_TEST_CASE(file_fetched_with_cat_in_another_process, *needs_io_uring) {
    const int fds_before = steward::test::open_fd_count();
    {
        family fam;
        runtime_dir files;
        std::string contents;
        const auto k = steward::share_key::generate();
        for (int i = 0; i < 3000; ++i) contents += k.to_hex() + (i % 7 == 0 ? "\n" : " ");  // ~100 KB
        const std::string path = temp_file(files.path, "data", contents);

        cli_process share({"share", path}, fam.env());
        const share_line line(share.read_line());
        const auto fetched = run_cli({"fetch", "--cat", line.id_text}, fam.env());
        BOOST_TEST(fetched.status == 0, fetched.err);
        BOOST_TEST(fetched.out == contents, "--cat output differs (" << fetched.out.size() << " bytes)");
        BOOST_TEST(fetched.err.find("type=file target=" + path) != std::string::npos, fetched.err);

        const auto served = share.finish();
        BOOST_TEST(served.status == 0, "share exits 0 once everything was fetched: " << served.err);
        BOOST_TEST(fam.dir.empty());
        ::unlink(path.c_str());
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(fetch_names_each_descriptor_type, *needs_io_uring) {
    const int fds_before = steward::test::open_fd_count();
    {
        family fam;
        runtime_dir files;
        const std::string path = temp_file(files.path, "plain", "plain file");
        const std::string dir = files.path + "/subdir";
        BOOST_REQUIRE(::mkdir(dir.c_str(), 0700) == 0);

        int p[2];
        BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
        steward::unique_fd pipe_read(p[0]), pipe_write(p[1]);
        BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p) == 0);
        steward::unique_fd sock_a(p[0]), sock_b(p[1]);
        steward::unique_fd memfd(::memfd_create("cli-test-memfd", MFD_CLOEXEC));
        BOOST_REQUIRE(memfd);

        cli_process share({"share", "--fd", "10", "--fd=11", "--fd", "12", path, dir}, fam.env(),
                          {{pipe_read.get(), 10}, {sock_a.get(), 11}, {memfd.get(), 12}});
        std::vector<std::string> ids;
        for (int i = 0; i < 5; ++i) ids.push_back(share_line(share.read_line()).id_text);

        std::vector<std::string> args{"fetch"};
        args.insert(args.end(), ids.begin(), ids.end());
        const auto fetched = run_cli(args, fam.env());
        BOOST_TEST(fetched.status == 0, fetched.err);
        const std::vector<std::string> lines = lines_of(fetched.out);
        BOOST_REQUIRE_EQUAL(lines.size(), 5U);
        const char* types[] = {"pipe", "socket", "memfd", "file", "dir"};
        const std::string targets[] = {"pipe:[", "socket:[", "/memfd:cli-test-memfd", path, dir};
        for (std::size_t i = 0; i < 5; ++i) {
            const std::vector<std::string> f = split(lines[i]);
            BOOST_REQUIRE_MESSAGE(f.size() >= 3, lines[i]);
            BOOST_TEST(f[0].starts_with("fd="));
            BOOST_TEST(f[0].size() > 3);
            BOOST_TEST(f[0].find_first_not_of("0123456789", 3) == std::string::npos, lines[i]);
            BOOST_TEST(f[1] == std::string("type=") + types[i], lines[i]);
            BOOST_TEST(lines[i].substr(lines[i].find("target=") + 7).starts_with(targets[i]), lines[i]);
        }
        BOOST_TEST(share.finish().status == 0);
        BOOST_TEST(fam.dir.empty());
        ::unlink(path.c_str());
        ::rmdir(dir.c_str());
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(cat_reads_pipe_and_socket_to_eof_and_memfd_from_offset_zero, *needs_io_uring) {
    const int fds_before = steward::test::open_fd_count();
    {
        family fam;
        int p[2];
        BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
        steward::unique_fd pipe_read(p[0]), pipe_write(p[1]);
        BOOST_REQUIRE(::write(pipe_write.get(), "pipe data|", 10) == 10);
        BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p) == 0);
        steward::unique_fd sock_a(p[0]), sock_b(p[1]);
        BOOST_REQUIRE(::write(sock_b.get(), "socket data|", 12) == 12);
        BOOST_REQUIRE(::shutdown(sock_b.get(), SHUT_WR) == 0);
        steward::unique_fd memfd(::memfd_create("cli-test-cat", MFD_CLOEXEC));
        BOOST_REQUIRE(::write(memfd.get(), "memfd data", 10) == 10);  // offset left at the end

        cli_process share({"share", "--fd", "20", "--fd", "21", "--fd", "22"}, fam.env(),
                          {{pipe_read.get(), 20}, {sock_a.get(), 21}, {memfd.get(), 22}});
        std::vector<std::string> args{"fetch", "--cat"};
        for (int i = 0; i < 3; ++i) args.push_back(share_line(share.read_line()).id_text);
        // Only the shared copies remain open elsewhere: the readers see end of file.
        pipe_write.reset();
        pipe_read.reset();
        sock_a.reset();

        const auto fetched = run_cli(args, fam.env());
        BOOST_TEST(fetched.status == 0, fetched.err);
        BOOST_TEST(fetched.out == "pipe data|socket data|memfd data");
        BOOST_TEST(lines_of(fetched.err).size() == 3U, fetched.err);  // the fd= lines moved to stderr
        BOOST_TEST(share.finish().status == 0);
        BOOST_TEST(fam.dir.empty());
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(second_fetch_of_an_id_is_refused, *needs_io_uring) {
    family fam;
    cli_process share({"share", "/etc/hostname", "/etc/hostname"}, fam.env());
    const share_line first(share.read_line());
    const share_line second(share.read_line());

    const auto once = run_cli({"fetch", first.id_text}, fam.env());
    BOOST_TEST(once.status == 0, once.err);
    BOOST_TEST(once.out.find("type=file") != std::string::npos);

    const auto again = run_cli({"fetch", first.id_text}, fam.env());
    BOOST_TEST(again.status != 0);
    BOOST_TEST(again.out.empty());
    BOOST_TEST(again.err.find("share not available") != std::string::npos, again.err);
    BOOST_TEST(again.err.find(first.id_text) != std::string::npos, "the message names the share");

    const auto other = run_cli({"fetch", second.id_text}, fam.env());
    BOOST_TEST(other.status == 0, other.err);
    BOOST_TEST(share.finish().status == 0);

    const auto gone = run_cli({"fetch", second.id_text}, fam.env());
    BOOST_TEST(gone.status != 0);
    BOOST_TEST(gone.err.find("no sharer is listening") != std::string::npos, gone.err);
    BOOST_TEST(fam.dir.empty());
}

BOOST_AUTO_TEST_CASE(wrong_authkey_is_refused_and_the_share_stays_fetchable, *needs_io_uring) {
    family fam;
    cli_process share({"share", "/etc/hostname"}, fam.env());
    const share_line line(share.read_line());

    const std::string other_key = steward::authkey::generate().to_hex();
    const auto wrong = run_cli({"fetch", "--authkey", other_key, line.id_text}, fam.env());
    BOOST_TEST(wrong.status != 0);
    BOOST_TEST(wrong.out.empty());
    BOOST_TEST(wrong.err.find("authentication failed") != std::string::npos, wrong.err);

    // The right key given explicitly (and not through the environment) still gets it.
    const auto right = run_cli({"fetch", "--authkey", fam.key.to_hex(), line.id_text}, fam.dir.env());
    BOOST_TEST(right.status == 0, right.err);
    BOOST_TEST(share.finish().status == 0);
    BOOST_TEST(fam.dir.empty());
}

BOOST_AUTO_TEST_CASE(share_with_authkey_option_and_no_environment_key, *needs_io_uring) {
    family fam;
    const std::string key = steward::authkey::generate().to_hex();
    cli_process share({"share", "--authkey", key, "/etc/hostname"}, fam.dir.env());
    const share_line line(share.read_line());
    const auto fetched = run_cli({"fetch", "--authkey=" + key, line.id_text}, fam.dir.env());
    BOOST_TEST(fetched.status == 0, fetched.err);
    const auto r = share.finish();
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.err.find("STEWARD_AUTHKEY") == std::string::npos, "no key notice when --authkey is given");
}

BOOST_AUTO_TEST_CASE(share_without_a_key_announces_the_one_fetchers_need, *needs_io_uring) {
    runtime_dir dir;  // and no STEWARD_AUTHKEY anywhere: the share makes up a key
    cli_process share({"share", "/etc/hostname"}, dir.env());
    const share_line line(share.read_line());
    BOOST_TEST(share.read_err_line().find("STEWARD_AUTHKEY is not set") != std::string::npos);
    const std::string export_line = share.read_err_line();
    const std::string prefix = "  export STEWARD_AUTHKEY=";
    BOOST_REQUIRE_MESSAGE(export_line.starts_with(prefix), export_line);
    const std::string hex = export_line.substr(prefix.size());
    std::error_code ec;
    (void)steward::authkey::from_hex(hex, ec);
    BOOST_REQUIRE_MESSAGE(!ec, "not a key: " << hex);

    const auto keyless = run_cli({"fetch", line.id_text}, dir.env());
    BOOST_TEST(keyless.status != 0);
    BOOST_TEST(keyless.err.find("STEWARD_AUTHKEY is not set and no --authkey was given") != std::string::npos,
               keyless.err);

    std::vector<std::string> env = dir.env();
    env.push_back("STEWARD_AUTHKEY=" + hex);
    const auto fetched = run_cli({"fetch", line.id_text}, env);
    BOOST_TEST(fetched.status == 0, fetched.err);
    BOOST_TEST(share.finish().status == 0);
    BOOST_TEST(dir.empty());
}

BOOST_AUTO_TEST_CASE(ttl_expiry_ends_share_with_status_1, *needs_io_uring) {
    family fam;
    cli_process share({"share", "--ttl", "0.3", "/etc/hostname"}, fam.env());
    const share_line line(share.read_line());
    const auto r = share.finish(10s);
    BOOST_TEST(r.status == 1, r.err);
    BOOST_TEST(r.err.find("ttl passed") != std::string::npos, r.err);
    BOOST_TEST(!exists(parent_dir(line.address)));
    BOOST_TEST(fam.dir.empty());
}

BOOST_AUTO_TEST_CASE(bad_arguments_fail_and_serve_nothing, *needs_io_uring) {
    const int fds_before = steward::test::open_fd_count();
    {
        family fam;
        const auto missing = run_cli({"share", "/etc/hostname", "/nonexistent/steward-test-file"}, fam.env());
        BOOST_TEST(missing.status != 0);
        BOOST_TEST(missing.out.empty(), "nothing shared: " << missing.out);
        BOOST_TEST(missing.err.find("/nonexistent/steward-test-file") != std::string::npos, missing.err);
        BOOST_TEST(fam.dir.empty(), "no socket directory was created");

        const auto closed_fd = run_cli({"share", "--fd", "57"}, fam.env());
        BOOST_TEST(closed_fd.status != 0);
        BOOST_TEST(closed_fd.out.empty());
        BOOST_TEST(closed_fd.err.find("--fd 57") != std::string::npos, closed_fd.err);

        const std::vector<std::vector<std::string>> usage_errors{
            {"share"},
            {"share", "--ttl", "soon", "/etc/hostname"},
            {"share", "--ttl", "-1", "/etc/hostname"},
            {"share", "--fd", "x"},
            {"share", "--authkey", "abc", "/etc/hostname"},
            {"share", "--frobnicate", "/etc/hostname"},
            {"share", "--ttl"},
            {"fetch"},
            {"fetch", "steward1:nothex@/tmp/x"},
            {"fetch", "--authkey", "12"},
            {"fetch", "--cpython", "/tmp/x"},
            {"fetch", "--cpython", "relative", "12"},
            {"fetch", "--cpython", "/tmp/x", "-5"},
        };
        for (const auto& args : usage_errors) {
            const auto r = run_cli(args, fam.env());
            BOOST_TEST(r.status == 64, args[0] << " " << (args.size() > 1 ? args[1] : "") << ": " << r.err);
            BOOST_TEST(r.err.find("usage: steward") != std::string::npos);
            BOOST_TEST(r.out.empty());
        }
        BOOST_TEST(fam.dir.empty());
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(fetch_from_cpython_resource_sharer,
                     *needs_io_uring* boost::unit_test::precondition(steward::test::python3_available)) {
    const int fds_before = steward::test::open_fd_count();
    {
        const steward::authkey key = steward::authkey::generate();
        steward::test::python_process py(
            {steward::test::python_script("cpython_share_server.py"), key.to_hex()}, true);
        const std::vector<std::string> memfd_share = split(py.read_line());
        const std::vector<std::string> pipe_share = split(py.read_line());
        BOOST_REQUIRE_EQUAL(memfd_share.size(), 2U);
        BOOST_REQUIRE_EQUAL(pipe_share.size(), 2U);

        const auto fetched =
            run_cli({"fetch", "--authkey", key.to_hex(), "--cat", "--cpython", memfd_share[0], memfd_share[1],
                     "--cpython", pipe_share[0], pipe_share[1]});
        BOOST_TEST(fetched.status == 0, fetched.err);
        BOOST_TEST(fetched.out == "memfd contents from CPythonpipe contents from CPython");
        const std::vector<std::string> info = lines_of(fetched.err);
        BOOST_REQUIRE_EQUAL(info.size(), 2U);
        BOOST_TEST(info[0].find("type=memfd target=/memfd:steward-cpython-test") != std::string::npos,
                   info[0]);
        BOOST_TEST(info[1].find("type=pipe target=pipe:[") != std::string::npos, info[1]);

        // CPython forgets a share once sent: the same ident again fails, with the reason.
        const auto again =
            run_cli({"fetch", "--authkey", key.to_hex(), "--cpython", memfd_share[0], memfd_share[1]});
        BOOST_TEST(again.status != 0);
        BOOST_TEST(again.err.find("share not available") != std::string::npos, again.err);

        py.close_stdin();
        BOOST_TEST(py.wait() == 0);
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}
