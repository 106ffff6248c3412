#include "tracker/codec.hpp"

#include <steward/error.hpp>

#include <array>
#include <cstdint>
#include <cstring>

namespace steward::detail::tracking {
namespace {

constexpr bool is_blank(char c) noexcept {
    // Python's bytes.strip(): space, \t, \n, \v, \f, \r.
    return c == ' ' || (c >= '\t' && c <= '\r');
}

std::string_view strip(std::string_view s) noexcept {
    while (!s.empty() && is_blank(s.front())) s.remove_prefix(1);
    while (!s.empty() && is_blank(s.back())) s.remove_suffix(1);
    return s;
}

bool parse_command(std::string_view s, command& cmd) noexcept {
    if (s == "REGISTER") {
        cmd = command::register_resource;
    } else if (s == "UNREGISTER") {
        cmd = command::unregister_resource;
    } else if (s == "PROBE") {
        cmd = command::probe;
    } else {
        return false;
    }
    return true;
}

// The checks shared by both formats once command, type and raw name are known.
decode_error finish_message(command cmd, std::string_view type_name, std::string_view name,
                            decoded_message& out, decode_scratch& scratch) noexcept {
    const auto type = parse_resource_type(type_name);
    if (!type) return decode_error::unknown_type;
    out.cmd = cmd;
    out.type = *type;
    if (cmd == command::probe) {
        out.name = name;
        return decode_error::none;
    }
    if (*type == resource_type::noop) return decode_error::noop_registered;
    return canonical_name(*type, name, scratch.name.data(), out.name);
}

bool has_high_bit(std::string_view s) noexcept {
    // Eight bytes per step: every colon-format line passes through here.
    std::uint64_t acc = 0;
    const char* p = s.data();
    std::size_t n = s.size();
    for (; n >= 8; p += 8, n -= 8) {
        std::uint64_t w;
        std::memcpy(&w, p, 8);
        acc |= w;
    }
    for (; n; ++p, --n) acc |= static_cast<unsigned char>(*p);
    return (acc & 0x8080808080808080ULL) != 0;
}

decode_error decode_colon(std::string_view line, decoded_message& out, decode_scratch& scratch) noexcept {
    if (has_high_bit(line)) return decode_error::not_ascii;
    const auto* first = static_cast<const char*>(std::memchr(line.data(), ':', line.size()));
    const auto* last = static_cast<const char*>(::memrchr(line.data(), ':', line.size()));
    if (!first || first == last) return decode_error::missing_separator;
    const auto first_at = static_cast<std::size_t>(first - line.data());
    const auto last_at = static_cast<std::size_t>(last - line.data());
    command cmd;
    if (!parse_command(line.substr(0, first_at), cmd)) return decode_error::unknown_command;
    return finish_message(cmd, line.substr(last_at + 1), line.substr(first_at + 1, last_at - first_at - 1),
                          out, scratch);
}

// A small JSON reader: exactly one object, string keys, values of any JSON type (only three keys
// are interpreted; others are skipped as CPython's json.loads would accept them). Strings are
// unescaped into the scratch area, which cannot overflow: an unescaped string is never longer than
// its escaped form and the whole line is at most 512 bytes.
class json_reader {
public:
    json_reader(std::string_view text, char* scratch) noexcept
        : p_(text.data()), end_(text.data() + text.size()), out_(scratch) {}

    struct field {
        std::string_view value;
        bool present = false;
        bool is_string = false;
    };

    bool parse_object(field& cmd, field& rtype, field& name) noexcept {
        skip_ws();
        if (!eat('{')) return false;
        skip_ws();
        if (eat('}')) return at_end();
        for (;;) {
            std::string_view key;
            skip_ws();
            if (!parse_string(key)) return false;
            skip_ws();
            if (!eat(':')) return false;
            skip_ws();
            field* target = key == "cmd"           ? &cmd
                            : key == "rtype"       ? &rtype
                            : key == "base64_name" ? &name
                                                   : nullptr;
            if (peek() == '"') {
                std::string_view value;
                if (!parse_string(value)) return false;
                if (target) *target = field{value, true, true};
            } else {
                if (!skip_value(0)) return false;
                if (target) *target = field{{}, true, false};
            }
            skip_ws();
            if (eat(',')) continue;
            if (eat('}')) return at_end();
            return false;
        }
    }

private:
    char peek() const noexcept { return p_ != end_ ? *p_ : '\0'; }
    bool eat(char c) noexcept {
        if (p_ != end_ && *p_ == c) {
            ++p_;
            return true;
        }
        return false;
    }
    void skip_ws() noexcept {
        while (p_ != end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
    }
    bool at_end() noexcept {
        skip_ws();
        return p_ == end_;
    }

    static int hex(char c) noexcept {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    }
    bool hex4(unsigned& v) noexcept {
        if (end_ - p_ < 4) return false;
        v = 0;
        for (int i = 0; i < 4; ++i) {
            const int h = hex(*p_++);
            if (h < 0) return false;
            v = (v << 4) | static_cast<unsigned>(h);
        }
        return true;
    }
    void put_utf8(unsigned cp) noexcept {
        if (cp < 0x80) {
            *out_++ = static_cast<char>(cp);
        } else if (cp < 0x800) {
            *out_++ = static_cast<char>(0xc0 | (cp >> 6));
            *out_++ = static_cast<char>(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
            *out_++ = static_cast<char>(0xe0 | (cp >> 12));
            *out_++ = static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
            *out_++ = static_cast<char>(0x80 | (cp & 0x3f));
        } else {
            *out_++ = static_cast<char>(0xf0 | (cp >> 18));
            *out_++ = static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
            *out_++ = static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
            *out_++ = static_cast<char>(0x80 | (cp & 0x3f));
        }
    }

    bool parse_string(std::string_view& result) noexcept {
        if (!eat('"')) return false;
        char* const start = out_;
        while (p_ != end_) {
            const char c = *p_++;
            if (c == '"') {
                result = std::string_view(start, static_cast<std::size_t>(out_ - start));
                return true;
            }
            if (static_cast<unsigned char>(c) < 0x20) return false;  // json.loads(strict=True)
            if (c != '\\') {
                *out_++ = c;
                continue;
            }
            if (p_ == end_) return false;
            const char e = *p_++;
            switch (e) {
                case '"':
                    *out_++ = '"';
                    break;
                case '\\':
                    *out_++ = '\\';
                    break;
                case '/':
                    *out_++ = '/';
                    break;
                case 'b':
                    *out_++ = '\b';
                    break;
                case 'f':
                    *out_++ = '\f';
                    break;
                case 'n':
                    *out_++ = '\n';
                    break;
                case 'r':
                    *out_++ = '\r';
                    break;
                case 't':
                    *out_++ = '\t';
                    break;
                case 'u': {
                    // "\uXXXX" is 6 bytes and yields at most 3; a surrogate pair is 12 and yields 4.
                    unsigned cp;
                    if (!hex4(cp)) return false;
                    if (cp >= 0xd800 && cp <= 0xdbff && end_ - p_ >= 6 && p_[0] == '\\' && p_[1] == 'u') {
                        const char* save = p_;
                        p_ += 2;
                        unsigned low;
                        if (hex4(low) && low >= 0xdc00 && low <= 0xdfff)
                            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
                        else
                            p_ = save;
                    }
                    put_utf8(cp);
                    break;
                }
                default:
                    return false;
            }
        }
        return false;
    }

    bool skip_value(int depth) noexcept {
        if (depth > 32) return false;
        skip_ws();
        const char c = peek();
        if (c == '"') {
            // Unescaping into scratch here is harmless: the scratch area holds the whole line.
            std::string_view ignored;
            return parse_string(ignored);
        }
        if (c == '{' || c == '[') {
            const char close = c == '{' ? '}' : ']';
            ++p_;
            skip_ws();
            if (eat(close)) return true;
            for (;;) {
                if (c == '{') {
                    std::string_view key;
                    skip_ws();
                    if (!parse_string(key)) return false;
                    skip_ws();
                    if (!eat(':')) return false;
                }
                if (!skip_value(depth + 1)) return false;
                skip_ws();
                if (eat(',')) continue;
                return eat(close);
            }
        }
        // Numbers and literals: one run of the characters they are made of. Python also accepts
        // NaN and Infinity; none of that matters for the three interpreted fields.
        const char* start = p_;
        while (p_ != end_ && ((*p_ >= '0' && *p_ <= '9') || (*p_ >= 'a' && *p_ <= 'z') ||
                              (*p_ >= 'A' && *p_ <= 'Z') || *p_ == '-' || *p_ == '+' || *p_ == '.'))
            ++p_;
        const std::string_view token(start, static_cast<std::size_t>(p_ - start));
        if (token == "true" || token == "false" || token == "null" || token == "NaN" || token == "Infinity" ||
            token == "-Infinity")
            return true;
        if (token.empty()) return false;
        std::size_t i = token[0] == '-' ? 1 : 0;
        if (i == token.size() || token[i] < '0' || token[i] > '9') return false;
        for (; i < token.size(); ++i) {
            const char d = token[i];
            if (!((d >= '0' && d <= '9') || d == '.' || d == 'e' || d == 'E' || d == '+' || d == '-'))
                return false;
        }
        return true;
    }

    const char* p_;
    const char* end_;
    char* out_;
};

decode_error decode_json(std::string_view line, decoded_message& out, decode_scratch& scratch) noexcept {
    json_reader reader(line, scratch.strings.data());
    json_reader::field cmd_field, type_field, name_field;
    if (!reader.parse_object(cmd_field, type_field, name_field)) return decode_error::bad_json;
    if (!cmd_field.present || !type_field.present) return decode_error::missing_field;
    if (!cmd_field.is_string || !type_field.is_string) return decode_error::field_not_string;
    command cmd;
    if (!parse_command(cmd_field.value, cmd)) return decode_error::unknown_command;
    if (!name_field.present) {
        if (cmd != command::probe) return decode_error::missing_field;
        return finish_message(cmd, type_field.value, {}, out, scratch);
    }
    if (!name_field.is_string) return decode_error::field_not_string;
    // Decode into the tail of the name buffer, so canonical_name() can still prepend a '/'.
    char* const decoded = scratch.name.data() + 1;
    std::size_t decoded_size = 0;
    if (!base64_decode(name_field.value, decoded, decoded_size)) return decode_error::bad_base64;
    const std::string_view raw(decoded, decoded_size);
    const auto type = parse_resource_type(type_field.value);
    if (!type) return decode_error::unknown_type;
    out.cmd = cmd;
    out.type = *type;
    if (cmd == command::probe) {
        out.name = raw;
        return decode_error::none;
    }
    if (*type == resource_type::noop) return decode_error::noop_registered;
    // canonical_name() may write its result over its input; it only ever moves bytes towards
    // the front by at most one position, which the buffer layout above allows.
    return canonical_name(*type, raw, scratch.name.data(), out.name);
}

constexpr char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

constexpr std::array<std::int8_t, 256> make_b64_table() {
    std::array<std::int8_t, 256> t{};
    for (auto& v : t) v = -1;
    for (int i = 0; i < 64; ++i) t[static_cast<unsigned char>(b64_alphabet[i])] = static_cast<std::int8_t>(i);
    t[static_cast<unsigned char>('+')] = 62;
    t[static_cast<unsigned char>('/')] = 63;
    return t;
}
constexpr auto b64_table = make_b64_table();

}  // namespace

std::string_view to_string(command cmd) noexcept {
    switch (cmd) {
        case command::register_resource:
            return "REGISTER";
        case command::unregister_resource:
            return "UNREGISTER";
        case command::probe:
            return "PROBE";
    }
    return "?";
}

std::string_view describe(decode_error error) noexcept {
    switch (error) {
        case decode_error::none:
            return "no error";
        case decode_error::too_long:
            return "message longer than 512 bytes";
        case decode_error::partial_line:
            return "unterminated message at end of input";
        case decode_error::empty_line:
            return "empty message";
        case decode_error::not_ascii:
            return "non-ASCII byte in a colon-format message (use JSON)";
        case decode_error::missing_separator:
            return "not CMD:NAME:TYPE (missing ':')";
        case decode_error::unknown_command:
            return "unknown command (not REGISTER, UNREGISTER or PROBE)";
        case decode_error::unknown_type:
            return "unknown resource type";
        case decode_error::bad_json:
            return "malformed JSON";
        case decode_error::missing_field:
            return "JSON message without \"cmd\", \"rtype\" or \"base64_name\"";
        case decode_error::field_not_string:
            return "JSON field is not a string";
        case decode_error::bad_base64:
            return "\"base64_name\" is not valid base64";
        case decode_error::noop_registered:
            return "type noop is for PROBE only";
        case decode_error::empty_name:
            return "empty name";
        case decode_error::nul_in_name:
            return "NUL byte in name";
        case decode_error::relative_path:
            return "file and directory names must be absolute paths";
        case decode_error::unsafe_path:
            return "refusing \"/\" and paths with \".\" or \"..\" components";
    }
    return "unknown error";
}

decode_error canonical_name(resource_type type, std::string_view name, char* out,
                            std::string_view& result) noexcept {
    if (name.empty()) return decode_error::empty_name;
    if (std::memchr(name.data(), '\0', name.size())) return decode_error::nul_in_name;
    switch (type) {
        case resource_type::shared_memory:
        case resource_type::semaphore:
            if (name.front() == '/') {
                result = name;
            } else {
                std::memmove(out + 1, name.data(), name.size());
                out[0] = '/';
                result = std::string_view(out, name.size() + 1);
            }
            return decode_error::none;
        case resource_type::file:
        case resource_type::directory: {
            if (name.front() != '/') return decode_error::relative_path;
            // Collapse "//" and drop a trailing '/', refusing "." and ".." components: cleanup must
            // remove exactly the object that was named, never a parent reached through "..".
            bool clean = true;
            std::size_t components = 0;
            for (std::size_t i = 0; i < name.size();) {
                if (name[i] == '/') {
                    if (i + 1 == name.size() || name[i + 1] == '/') clean = false;
                    ++i;
                    continue;
                }
                std::size_t j = i;
                while (j < name.size() && name[j] != '/') ++j;
                const auto component = name.substr(i, j - i);
                if (component == "." || component == "..") return decode_error::unsafe_path;
                ++components;
                i = j;
            }
            if (components == 0) return decode_error::unsafe_path;
            if (clean) {
                result = name;
                return decode_error::none;
            }
            std::size_t n = 0;
            for (std::size_t i = 0; i < name.size(); ++i) {
                if (name[i] == '/' && (i + 1 == name.size() || name[i + 1] == '/')) continue;
                out[n++] = name[i];  // n <= i, so writing over the input is safe
            }
            result = std::string_view(out, n);
            return decode_error::none;
        }
        case resource_type::noop:
            return decode_error::noop_registered;
    }
    return decode_error::unknown_type;
}

decode_error decode_line(std::string_view line, decoded_message& out, decode_scratch& scratch) noexcept {
    if (line.size() > max_message_size) return decode_error::too_long;
    line = strip(line);
    if (line.empty()) return decode_error::empty_line;
    if (line.front() == '{') return decode_json(line, out, scratch);
    return decode_colon(line, out, scratch);
}

namespace {

// What one byte of a name asks of the encoder: json_byte (anything but printable ASCII, or ':'),
// nul_byte (a NUL, refused; it is a control byte, so json_byte too). One table lookup per byte
// instead of three comparisons, and one pass answers both questions.
constexpr std::uint8_t json_byte = 1, nul_byte = 2;
constexpr std::array<std::uint8_t, 256> name_byte_class = [] {
    std::array<std::uint8_t, 256> t{};
    for (unsigned c = 0; c < 256; ++c)
        if (c < 0x20 || c > 0x7e || c == ':') t[c] = json_byte;
    t[0] |= nul_byte;
    return t;
}();

unsigned scan_name(std::string_view name) noexcept {
    unsigned acc = 0;
    for (const char c : name) acc |= name_byte_class[static_cast<unsigned char>(c)];
    return acc;
}

}  // namespace

bool needs_json(std::string_view name) noexcept {
    return (scan_name(name) & json_byte) != 0;
}

std::size_t base64url_encode(std::string_view in, char* out) noexcept {
    const auto* s = reinterpret_cast<const unsigned char*>(in.data());
    std::size_t n = in.size(), o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        const unsigned v = (unsigned{s[i]} << 16) | (unsigned{s[i + 1]} << 8) | s[i + 2];
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = b64_alphabet[(v >> 6) & 63];
        out[o++] = b64_alphabet[v & 63];
    }
    if (n - i == 1) {
        const unsigned v = unsigned{s[i]} << 16;
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = '=';
        out[o++] = '=';
    } else if (n - i == 2) {
        const unsigned v = (unsigned{s[i]} << 16) | (unsigned{s[i + 1]} << 8);
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = b64_alphabet[(v >> 6) & 63];
        out[o++] = '=';
    }
    return o;
}

bool base64_decode(std::string_view in, char* out, std::size_t& out_size) noexcept {
    std::size_t padding = 0;
    while (!in.empty() && in.back() == '=' && padding < 2) {
        in.remove_suffix(1);
        ++padding;
    }
    if (padding && (in.size() + padding) % 4 != 0) return false;
    if (in.size() % 4 == 1) return false;
    std::size_t o = 0;
    unsigned acc = 0;
    int bits = 0;
    for (const char c : in) {
        const int v = b64_table[static_cast<unsigned char>(c)];
        if (v < 0) return false;  // includes a third '=' or '=' in the middle
        acc = (acc << 6) | static_cast<unsigned>(v);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = static_cast<char>((acc >> bits) & 0xff);
        }
    }
    out_size = o;
    return true;
}

namespace {

// encode_message() into @p buf (max_message_size bytes); @p size is 0 on error.
std::error_code encode_to(command cmd, resource_type type, std::string_view name, char* buf,
                          std::size_t& size) noexcept {
    size = 0;
    if (cmd == command::probe) {
        constexpr std::string_view probe = "PROBE:0:noop\n";
        std::memcpy(buf, probe.data(), probe.size());
        size = probe.size();
        return {};
    }
    const unsigned scan = scan_name(name);
    if (type == resource_type::noop || name.empty() || (scan & nul_byte) != 0)
        return std::make_error_code(std::errc::invalid_argument);
    const auto cmd_name = to_string(cmd);
    const auto type_name = to_string(type);
    if ((scan & json_byte) == 0) {
        const std::size_t total = cmd_name.size() + 1 + name.size() + 1 + type_name.size() + 1;
        if (total > max_message_size) return errc::message_too_long;
        char* p = buf;
        std::memcpy(p, cmd_name.data(), cmd_name.size());
        p += cmd_name.size();
        *p++ = ':';
        std::memcpy(p, name.data(), name.size());
        p += name.size();
        *p++ = ':';
        std::memcpy(p, type_name.data(), type_name.size());
        p += type_name.size();
        *p++ = '\n';
        size = total;
        return {};
    }
    constexpr std::string_view a = "{\"cmd\":\"", b = "\",\"rtype\":\"", c = "\",\"base64_name\":\"",
                               d = "\"}\n";
    const std::size_t b64_size = (name.size() + 2) / 3 * 4;
    const std::size_t total =
        a.size() + cmd_name.size() + b.size() + type_name.size() + c.size() + b64_size + d.size();
    if (total > max_message_size) return errc::message_too_long;
    char* p = buf;
    for (const auto part : {a, cmd_name, b, type_name, c}) {
        std::memcpy(p, part.data(), part.size());
        p += part.size();
    }
    p += base64url_encode(name, p);
    std::memcpy(p, d.data(), d.size());
    size = total;
    return {};
}

}  // namespace

std::error_code encode_message(command cmd, resource_type type, std::string_view name,
                               encoded_message& out) noexcept {
    return encode_to(cmd, type, name, out.bytes.data(), out.size);
}

std::error_code append_message(command cmd, resource_type type, std::string_view name, std::string& out) {
    encoded_message message;
    if (auto ec = encode_message(cmd, type, name, message)) return ec;
    out.append(message.view());
    return {};
}

std::error_code client_canonical_name(resource_type type, std::string_view name, char* out,
                                       std::string_view& result) noexcept {
    if (type == resource_type::noop) return std::make_error_code(std::errc::invalid_argument);
    if (canonical_name(type, name, out, result) != decode_error::none)
        return std::make_error_code(std::errc::invalid_argument);
    return {};
}

std::error_code encode_into(bool register_it, resource_type type, std::string_view name, char* out,
                               std::size_t& size) noexcept {
    return encode_to(register_it ? command::register_resource : command::unregister_resource, type, name, out,
                     size);
}

}  // namespace steward::detail::tracking
