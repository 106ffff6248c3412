#pragma once
// Running the real `steward` executable (STEWARD_CLI_EXE_FOR_TESTS) from a test: stdout and
// stderr through pipes, extra descriptors at chosen numbers, bounded waits (a hang fails the test
// instead of stalling CI), and a private runtime directory whose leftovers a test can check.

#include <steward/authkey.hpp>
#include <steward/io/async_spawn.hpp>
#include <steward/unique_fd.hpp>

#include <asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace steward::test {

/// How a finished CLI run ended and what it wrote.
struct cli_result {
    int status = -1;  ///< exit code, or 128 + signal number when killed
    std::string out;  ///< what was written to stdout after the lines read with read_line()
    std::string err;  ///< what was written to stderr after the lines read with read_err_line()
};

/// One running `steward ARGS...`.
class cli_process {
public:
    static constexpr auto default_limit = std::chrono::seconds(20);

    /// Starts the CLI with @p args (argv[1...]), the environment entries @p env ("NAME=value",
    /// added to this process's) and the descriptors @p fds placed at the chosen numbers.
    explicit cli_process(const std::vector<std::string>& args, const std::vector<std::string>& env = {},
                         const std::vector<io::fd_mapping>& fds = {}) {
        int p[2];
        BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
        out_.reset(p[0]);
        unique_fd out_write(p[1]);
        BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
        err_.reset(p[0]);
        unique_fd err_write(p[1]);
        io::spawn_options options;
        options.environment = env;
        options.fds = fds;
        options.fds.push_back({out_write.get(), 1});
        options.fds.push_back({err_write.get(), 2});
        std::vector<std::string> argv{STEWARD_CLI_EXE_FOR_TESTS};
        argv.insert(argv.end(), args.begin(), args.end());
        child_ = io::spawn(ctx_.get_executor(), argv, options);
    }
    cli_process(const cli_process&) = delete;
    cli_process& operator=(const cli_process&) = delete;
    ~cli_process() {
        if (child_.valid() && !child_.status()) {
            std::error_code ignored;
            child_.kill(ignored);
            (void)child_.wait(ignored);
        }
    }

    [[nodiscard]] pid_t pid() const { return child_.pid(); }

    /// The next line of stdout (without the newline). Fails the test at EOF or after @p limit.
    std::string read_line(std::chrono::milliseconds limit = default_limit) {
        return read_line_from(out_.get(), out_buffer_, limit);
    }
    /// The next line of stderr, as read_line().
    std::string read_err_line(std::chrono::milliseconds limit = default_limit) {
        return read_line_from(err_.get(), err_buffer_, limit);
    }

    /// Sends @p signo to the child (through its pidfd).
    void send_signal(int signo) { child_.send_signal(signo); }

    /// Reads stdout and stderr to EOF and reaps the child. Kills it and fails the test if that
    /// takes longer than @p limit.
    cli_result finish(std::chrono::milliseconds limit = default_limit) {
        const auto deadline = std::chrono::steady_clock::now() + limit;
        cli_result result;
        result.out = std::move(out_buffer_);
        out_buffer_.clear();
        result.err = std::move(err_buffer_);
        err_buffer_.clear();
        bool out_open = true;
        bool err_open = true;
        while (out_open || err_open) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0) break;
            pollfd pfds[2] = {{out_open ? out_.get() : -1, POLLIN, 0},
                              {err_open ? err_.get() : -1, POLLIN, 0}};
            if (::poll(pfds, 2, static_cast<int>(left.count())) <= 0) continue;
            for (int i = 0; i < 2; ++i) {
                if (pfds[i].revents == 0) continue;
                char buffer[4096];
                const ssize_t n = ::read(pfds[i].fd, buffer, sizeof buffer);
                if (n <= 0) {
                    (i == 0 ? out_open : err_open) = false;
                } else {
                    (i == 0 ? result.out : result.err).append(buffer, static_cast<std::size_t>(n));
                }
            }
        }
        std::optional<io::exit_status> status;
        while (!(status = child_.try_wait()) && std::chrono::steady_clock::now() < deadline)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        if (!status) {
            std::error_code ignored;
            child_.kill(ignored);
            (void)child_.wait(ignored);
            BOOST_FAIL("steward did not exit within the limit; stderr: " << result.err);
        }
        result.status = status->exited() ? status->code() : 128 + status->signal();
        return result;
    }

private:
    static std::string read_line_from(int fd, std::string& buffered, std::chrono::milliseconds limit) {
        const auto deadline = std::chrono::steady_clock::now() + limit;
        for (;;) {
            if (const auto nl = buffered.find('\n'); nl != std::string::npos) {
                std::string line = buffered.substr(0, nl);
                buffered.erase(0, nl + 1);
                return line;
            }
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now());
            BOOST_REQUIRE_MESSAGE(left.count() > 0,
                                  "no line from steward within the limit; so far: '" << buffered << "'");
            pollfd pfd{fd, POLLIN, 0};
            const int ready = ::poll(&pfd, 1, static_cast<int>(left.count()));
            if (ready <= 0) continue;
            char buffer[4096];
            const ssize_t n = ::read(fd, buffer, sizeof buffer);
            BOOST_REQUIRE_MESSAGE(n > 0,
                                  "steward closed its output before a full line: '" << buffered << "'");
            buffered.append(buffer, static_cast<std::size_t>(n));
        }
    }

    asio::io_context ctx_{1};
    io::child_process child_;
    unique_fd out_;
    unique_fd err_;
    std::string out_buffer_;
    std::string err_buffer_;
};

/// Runs `steward ARGS...` to completion.
inline cli_result run_cli(const std::vector<std::string>& args, const std::vector<std::string>& env = {},
                          const std::vector<io::fd_mapping>& fds = {}) {
    cli_process p(args, env, fds);
    return p.finish();
}

/// Names (other than . and ..) in directory @p path; empty if it cannot be read.
inline std::vector<std::string> directory_entries(const std::string& path) {
    std::vector<std::string> names;
    DIR* dir = ::opendir(path.c_str());
    if (!dir) return names;
    while (auto* entry = ::readdir(dir)) {
        const std::string name = entry->d_name;
        if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(dir);
    return names;
}

/// A fresh 0700 directory used as the CLI's XDG_RUNTIME_DIR and TMPDIR, so a test can check
/// that the sharer's socket directory is gone afterwards; removed (if empty) by the destructor.
struct runtime_dir {
    std::string path;
    runtime_dir() {
        std::string templ = "/tmp/steward-cli-test-XXXXXX";
        BOOST_REQUIRE(::mkdtemp(templ.data()) != nullptr);
        path = templ;
    }
    runtime_dir(const runtime_dir&) = delete;
    runtime_dir& operator=(const runtime_dir&) = delete;
    ~runtime_dir() {
        // A failed test may have left a sharer directory behind (its socket `s` inside): tidy up
        // so /tmp does not collect them; the test itself checks empty() where it matters.
        for (const std::string& name : directory_entries(path)) {
            const std::string sub = path + "/" + name;
            ::unlink((sub + "/s").c_str());
            if (::rmdir(sub.c_str()) != 0) ::unlink(sub.c_str());
        }
        ::rmdir(path.c_str());
    }
    [[nodiscard]] std::vector<std::string> env() const {
        return {"XDG_RUNTIME_DIR=" + path, "TMPDIR=" + path};
    }
    [[nodiscard]] bool empty() const { return directory_entries(path).empty(); }
};

}  // namespace steward::test
