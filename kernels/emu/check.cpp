// Runs every kernel of kernels/*.cu under the CPU emulation (emu.hpp) on small random problems
// and compares each result with a plain loop written from the kernel's contract. Exits 1 on the
// first mismatch, printing what differed. Built and run by kernels/tests/emulated.rs.
#include "emu.hpp"

#include <cstdio>
#include <random>
#include <string>

#include "../common.cuh"
#include "../elementwise.cu"
#include "../kv.cu"
#include "../attention.cu"

static std::mt19937_64 rng(20261204);

static float uniform(float lo, float hi) {
    return std::uniform_real_distribution<float>(lo, hi)(rng);
}

static std::vector<float> randoms(size_t n, float scale = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform(-scale, scale);
    return v;
}

static int failures = 0;

static void check_close(const char* what, const std::vector<float>& got,
                        const std::vector<float>& want, float atol, float rtol) {
    if (got.size() != want.size()) {
        std::printf("FAIL %s: %zu values, expected %zu\n", what, got.size(), want.size());
        ++failures;
        return;
    }
    float worst = 0.0f;
    size_t at = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        const float diff = std::fabs(got[i] - want[i]);
        const float err = diff == 0.0f ? 0.0f : diff / (atol + rtol * std::fabs(want[i]));
        if (!(err <= worst)) {
            worst = err;
            at = i;
        }
    }
    if (!(worst <= 1.0f)) {
        std::printf("FAIL %s: index %zu got %.7g want %.7g (error %.3g of tolerance)\n", what,
                    at, got[at], want[at], worst);
        ++failures;
    } else {
        std::printf("ok   %s (worst %.3f of tolerance, %zu values)\n", what, worst, got.size());
    }
}

static float bf_round(float f) { return emu_bf(hp_f2bf(f)); }

static void test_elementwise() {
    const int rows = 5, cols = 80;
    // embed
    {
        const int vocab = 37;
        std::vector<unsigned short> table(vocab * cols);
        std::vector<float> tf(vocab * cols);
        for (size_t i = 0; i < table.size(); ++i) {
            table[i] = hp_f2bf(uniform(-1, 1));
            tf[i] = emu_bf(table[i]);
        }
        std::vector<unsigned> tokens = {3, 0, 36, 3, 17};
        std::vector<float> out(rows * cols), want(rows * cols);
        emu_launch(dim3(rows), dim3(64), 0,
                   [&] { hp_embed(table.data(), tokens.data(), out.data(), cols); });
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < cols; ++c) want[r * cols + c] = tf[tokens[r] * cols + c];
        check_close("embed", out, want, 0, 0);
    }
    // rms_norm
    {
        auto x = randoms(rows * cols, 3.0f), w = randoms(cols);
        std::vector<float> out(rows * cols), want(rows * cols), outb(rows * cols);
        std::vector<unsigned short> ob(rows * cols);
        emu_launch(dim3(rows), dim3(64), 0, [&] {
            hp_rms_norm(x.data(), w.data(), out.data(), ob.data(), cols, 1e-5f);
        });
        for (int r = 0; r < rows; ++r) {
            double ss = 0;
            for (int c = 0; c < cols; ++c) ss += (double)x[r * cols + c] * x[r * cols + c];
            const double inv = 1.0 / std::sqrt(ss / cols + 1e-5);
            for (int c = 0; c < cols; ++c) want[r * cols + c] = (float)(x[r * cols + c] * inv * w[c]);
        }
        for (size_t i = 0; i < ob.size(); ++i) outb[i] = emu_bf(ob[i]);
        check_close("rms_norm", out, want, 1e-6f, 1e-5f);
        check_close("rms_norm bf16 copy", outb, want, 1e-6f, 8e-3f);
    }
    // add_bias, add, to_bf16, silu_mul
    {
        auto x = randoms(rows * cols), y = randoms(rows * cols), b = randoms(cols);
        auto x1 = x;
        std::vector<float> want(rows * cols);
        emu_launch(dim3(3), dim3(64), 0,
                   [&] { hp_add_bias(x1.data(), b.data(), (u64)rows * cols, cols); });
        for (int i = 0; i < rows * cols; ++i) want[i] = x[i] + b[i % cols];
        check_close("add_bias", x1, want, 0, 0);
        auto x2 = x;
        emu_launch(dim3(2), dim3(96), 0, [&] { hp_add(x2.data(), y.data(), (u64)rows * cols); });
        for (int i = 0; i < rows * cols; ++i) want[i] = x[i] + y[i];
        check_close("add", x2, want, 0, 0);
        std::vector<unsigned short> yb(rows * cols);
        emu_launch(dim3(1), dim3(64), 0, [&] { hp_to_bf16(x.data(), yb.data(), (u64)rows * cols); });
        std::vector<float> ybf(rows * cols);
        for (int i = 0; i < rows * cols; ++i) {
            ybf[i] = emu_bf(yb[i]);
            want[i] = x[i];
        }
        check_close("to_bf16", ybf, want, 0, 4e-3f);
        auto g = x;
        std::vector<unsigned short> gb(rows * cols);
        emu_launch(dim3(4), dim3(32), 0,
                   [&] { hp_silu_mul(g.data(), y.data(), gb.data(), (u64)rows * cols); });
        for (int i = 0; i < rows * cols; ++i) want[i] = x[i] / (1.0f + std::exp(-x[i])) * y[i];
        check_close("silu_mul", g, want, 1e-7f, 1e-6f);
    }
    // rope, both layouts
    for (int half_split = 0; half_split < 2; ++half_split) {
        const int hd = 16, c2 = 3 * hd;
        auto x = randoms(rows * c2);
        std::vector<unsigned> pos = {0, 1, 7, 300, 4095};
        std::vector<float> inv(hd / 2);
        for (int i = 0; i < hd / 2; ++i) inv[i] = std::pow(10000.0f, -(float)(2 * i) / hd);
        auto got = x, want = x;
        emu_launch(dim3(2), dim3(64), 0, [&] {
            hp_rope(got.data(), pos.data(), inv.data(), rows, c2, hd, half_split);
        });
        for (int r = 0; r < rows; ++r)
            for (int h = 0; h < c2 / hd; ++h)
                for (int i = 0; i < hd / 2; ++i) {
                    const double th = (double)(float)((float)pos[r] * inv[i]);
                    const int ia = half_split ? i : 2 * i, ib = half_split ? i + hd / 2 : 2 * i + 1;
                    const double a = x[r * c2 + h * hd + ia], bb = x[r * c2 + h * hd + ib];
                    want[r * c2 + h * hd + ia] = (float)(a * std::cos(th) - bb * std::sin(th));
                    want[r * c2 + h * hd + ib] = (float)(a * std::sin(th) + bb * std::cos(th));
                }
        check_close(half_split ? "rope half-split" : "rope interleaved", got, want, 1e-5f, 1e-4f);
    }
    // gather_rows, argmax
    {
        auto x = randoms(rows * cols);
        std::vector<unsigned> sel = {4, 0, 2};
        std::vector<float> out(sel.size() * cols), want(sel.size() * cols);
        emu_launch(dim3(3), dim3(32), 0,
                   [&] { hp_gather_rows(x.data(), sel.data(), out.data(), cols); });
        for (size_t i = 0; i < sel.size(); ++i)
            for (int c = 0; c < cols; ++c) want[i * cols + c] = x[sel[i] * cols + c];
        check_close("gather_rows", out, want, 0, 0);
        // Ties go to the first index, as the CPU's argmax.
        x[1 * cols + 10] = 5.0f;
        x[1 * cols + 70] = 5.0f;
        x[3 * cols + 79] = 9.0f;
        for (int c = 0; c < cols; ++c) x[4 * cols + c] = -INFINITY;
        std::vector<unsigned> am(rows);
        emu_launch(dim3(rows), dim3(64), 0, [&] { hp_argmax(x.data(), am.data(), cols); });
        std::vector<float> got(rows), wantv(rows);
        for (int r = 0; r < rows; ++r) {
            int best = 0;
            for (int c = 0; c < cols; ++c)
                if (x[r * cols + c] > x[r * cols + best]) best = c;
            got[r] = (float)am[r];
            wantv[r] = (float)best;
        }
        check_close("argmax", got, wantv, 0, 0);
    }
}

struct Geometry {
    int layers, block_size, kv_heads, group, head_dim;
    int heads() const { return kv_heads * group; }
    int kv_dim() const { return kv_heads * head_dim; }
    u64 plane() const { return (u64)block_size * kv_dim(); }
    u64 block_elems() const { return 2 * (u64)layers * plane(); }
};

struct SeqSpec {
    int start, ntok;
};

// Builds items of at most `qt` tokens, as the host code does.
static std::vector<unsigned> make_items(const std::vector<SeqSpec>& seqs,
                                        const std::vector<unsigned>& table_off, int qt) {
    std::vector<unsigned> items;
    int row = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
        for (int t0 = 0; t0 < seqs[s].ntok; t0 += qt) {
            const int n = std::min(qt, seqs[s].ntok - t0);
            const unsigned pos0 = (unsigned)(seqs[s].start + t0);
            items.insert(items.end(), {pos0, (unsigned)(row + t0), (unsigned)n, table_off[s],
                                       pos0 + (unsigned)n});
        }
        row += seqs[s].ntok;
    }
    return items;
}

static void test_attention(const char* name, Geometry geo, std::vector<SeqSpec> seqs, int splits,
                           bool mma) {
    const int layer = geo.layers - 1;
    const int hd = geo.head_dim, heads = geo.heads(), qd = heads * hd;
    // Block tables: a random permutation of slots, each sequence its own.
    std::vector<unsigned> tables, table_off;
    int slots = 0;
    for (auto& s : seqs) slots += (s.start + s.ntok + geo.block_size - 1) / geo.block_size;
    slots += 3;
    std::vector<unsigned> perm(slots);
    for (int i = 0; i < slots; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    int next = 0;
    for (auto& s : seqs) {
        table_off.push_back((unsigned)tables.size());
        const int nb = (s.start + s.ntok + geo.block_size - 1) / geo.block_size;
        for (int b = 0; b < nb; ++b) tables.push_back(perm[next++]);
    }
    // The pool: random bf16 everywhere (cached prefixes); the step's own rows are written by
    // hp_write_kv first, as the decoder does.
    std::vector<unsigned short> pool(slots * geo.block_elems());
    for (auto& v : pool) v = hp_f2bf(uniform(-1, 1));
    int rows = 0;
    for (auto& s : seqs) rows += s.ntok;
    auto k = randoms((size_t)rows * geo.kv_dim()), v = randoms((size_t)rows * geo.kv_dim());
    std::vector<unsigned> row_slot, row_off;
    for (size_t s = 0; s < seqs.size(); ++s)
        for (int i = 0; i < seqs[s].ntok; ++i) {
            const int p = seqs[s].start + i;
            row_slot.push_back(tables[table_off[s] + p / geo.block_size]);
            row_off.push_back((unsigned)(p % geo.block_size));
        }
    emu_launch(dim3(3), dim3(128), 0, [&] {
        hp_write_kv(k.data(), v.data(), pool.data(), row_slot.data(), row_off.data(), rows,
                    geo.kv_dim(), layer, geo.layers, geo.block_size);
    });
    {
        std::vector<float> got, want;
        for (int r = 0; r < rows; ++r)
            for (int d = 0; d < geo.kv_dim(); ++d) {
                const u64 base = ((u64)row_slot[r] * geo.layers + layer) * 2 * geo.plane() +
                                 (u64)row_off[r] * geo.kv_dim() + d;
                got.push_back(emu_bf(pool[base]));
                want.push_back(bf_round(k[r * geo.kv_dim() + d]));
                got.push_back(emu_bf(pool[base + geo.plane()]));
                want.push_back(bf_round(v[r * geo.kv_dim() + d]));
            }
        check_close((std::string(name) + " write_kv").c_str(), got, want, 0, 0);
    }
    auto q = randoms((size_t)rows * qd);
    const float scale = 1.0f / std::sqrt((float)hd);
    int max_ctx = 0;
    for (auto& s : seqs) max_ctx = std::max(max_ctx, s.start + s.ntok);
    const int tile = 64;
    const int split_len = ((max_ctx + splits - 1) / splits + tile - 1) / tile * tile;
    const int qt = mma ? 64 / geo.group : std::max(1, 16 / geo.group);
    auto items = make_items(seqs, table_off, qt);
    const int nitems = (int)items.size() / 5;
    std::vector<float> out(rows * qd, NAN), part_o((size_t)splits * rows * qd, NAN),
        part_ml((size_t)splits * rows * heads * 2, NAN);
    std::vector<unsigned short> out_bf(rows * qd);
    const int threads = mma ? 128 : 32 * qt * geo.group;
    const size_t smem = mma ? (size_t)(HP_MMA_KT * (hd + 8) + hd * (HP_MMA_KT + 8)) * 2
                            : (size_t)(HP_SIMPLE_KT * (hd + 4) + HP_SIMPLE_KT * hd +
                                       qt * geo.group * hd) * 4;
    emu_launch(dim3(nitems, geo.kv_heads, splits), dim3(threads), smem, [&] {
        if (mma)
            hp_attention_mma(q.data(), pool.data(), tables.data(), items.data(), out.data(),
                             out_bf.data(), part_o.data(), part_ml.data(), rows, layer,
                             geo.layers, geo.block_size, heads, geo.kv_heads, hd, split_len,
                             scale);
        else
            hp_attention_simple(q.data(), pool.data(), tables.data(), items.data(), out.data(),
                                out_bf.data(), part_o.data(), part_ml.data(), rows, layer,
                                geo.layers, geo.block_size, heads, geo.kv_heads, hd, split_len,
                                scale);
    });
    if (splits > 1) {
        emu_launch(dim3(rows * heads), dim3(32), 0, [&] {
            hp_attention_combine(part_o.data(), part_ml.data(), out.data(), out_bf.data(), rows,
                                 heads, hd, splits);
        });
    }
    // Reference: plain causal softmax attention in double over the pool's bf16 values.
    std::vector<float> want(rows * qd);
    int row = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
        for (int i = 0; i < seqs[s].ntok; ++i, ++row) {
            const int p = seqs[s].start + i;
            for (int h = 0; h < heads; ++h) {
                const int kvh = h / geo.group;
                std::vector<double> sc(p + 1);
                double mx = -1e300;
                for (int key = 0; key <= p; ++key) {
                    const u64 base = ((u64)tables[table_off[s] + key / geo.block_size] *
                                          geo.layers + layer) * 2 * geo.plane() +
                                     (u64)(key % geo.block_size) * geo.kv_dim() + (u64)kvh * hd;
                    double dot = 0;
                    for (int d = 0; d < hd; ++d)
                        dot += (double)q[(size_t)row * qd + h * hd + d] * emu_bf(pool[base + d]);
                    sc[key] = dot * scale;
                    mx = std::max(mx, sc[key]);
                }
                double sum = 0;
                for (auto& x : sc) sum += (x = std::exp(x - mx));
                for (int d = 0; d < hd; ++d) {
                    double acc = 0;
                    for (int key = 0; key <= p; ++key) {
                        const u64 base = ((u64)tables[table_off[s] + key / geo.block_size] *
                                              geo.layers + layer) * 2 * geo.plane() +
                                         (u64)(key % geo.block_size) * geo.kv_dim() +
                                         (u64)kvh * hd + geo.plane();
                        acc += sc[key] * emu_bf(pool[base + d]);
                    }
                    want[(size_t)row * qd + h * hd + d] = (float)(acc / sum);
                }
            }
        }
    }
    // The tensor-core kernel rounds the scaled queries and the probabilities to bf16.
    check_close(name, out, want, mma ? 1e-2f : 2e-5f, mma ? 2e-2f : 1e-4f);
    std::vector<float> outb(out_bf.size());
    for (size_t i = 0; i < outb.size(); ++i) outb[i] = emu_bf(out_bf[i]);
    check_close((std::string(name) + " bf16 copy").c_str(), outb, out, 1e-6f, 8e-3f);
}

static void test_kv_copy() {
    Geometry geo{3, 4, 2, 2, 8};
    const u64 words = geo.block_elems() * 2 / 16;  // 16-byte words per block
    const int nsrc = 6, ndst = 5;
    std::vector<uint4> src(nsrc * words), dst(ndst * words);
    for (auto& w : src) w = make_uint4((unsigned)rng(), (unsigned)rng(), (unsigned)rng(), (unsigned)rng());
    for (auto& w : dst) w = make_uint4(0, 0, 0, 0);
    std::vector<unsigned> pairs = {5, 0, 1, 3, 2, 4};
    const u64 layer_words = words / geo.layers;
    // Layer 1 only (two blocks striding over three pairs), then everything.
    emu_launch(dim3(2, 2), dim3(32), 0, [&] {
        hp_kv_copy(src.data(), dst.data(), pairs.data(), 3, words, layer_words, layer_words);
    });
    int bad = 0;
    for (int p = 0; p < 3; ++p)
        for (u64 i = 0; i < words; ++i) {
            const uint4 a = dst[pairs[2 * p + 1] * words + i];
            const bool in_layer = i >= layer_words && i < 2 * layer_words;
            const uint4 b = in_layer ? src[pairs[2 * p] * words + i] : make_uint4(0, 0, 0, 0);
            bad += a.x != b.x || a.y != b.y || a.z != b.z || a.w != b.w;
        }
    emu_launch(dim3(1, 3), dim3(64), 0,
               [&] { hp_kv_copy(src.data(), dst.data(), pairs.data(), 3, words, 0, words); });
    for (int p = 0; p < 3; ++p)
        for (u64 i = 0; i < words; ++i) {
            const uint4 a = dst[pairs[2 * p + 1] * words + i], b = src[pairs[2 * p] * words + i];
            bad += a.x != b.x || a.y != b.y || a.z != b.z || a.w != b.w;
        }
    // Slots that are no pair's destination stay untouched.
    for (u64 i = 0; i < words; ++i) bad += dst[1 * words + i].x != 0 || dst[2 * words + i].x != 0;
    if (bad) {
        std::printf("FAIL kv_copy: %d words differ\n", bad);
        ++failures;
    } else {
        std::printf("ok   kv_copy\n");
    }
}

int main(int argc, char** argv) {
    const std::string only = argc > 1 ? argv[1] : "";
    if (only.empty() || only == "elementwise") test_elementwise();
    if (only.empty() || only == "kv") test_kv_copy();
    if (only.empty() || only == "attention") {
        // Decode (one token), prefill from scratch, prefill after a cached prefix, several
        // sequences with different contexts; group sizes 1, 3 and 4; splits.
        const Geometry tiny{2, 16, 2, 2, 16}, smol{2, 16, 1, 3, 64}, llama{2, 16, 1, 4, 128};
        // A head dim that is a multiple of 4 but not 8: the CUDA-core kernel's scalar loads.
        test_attention("simple head dim 12", Geometry{1, 16, 2, 1, 12}, {{40, 1}, {0, 19}}, 2, false);
        for (int mma = 0; mma < 2; ++mma) {
            const char* k = mma ? "mma" : "simple";
            auto nm = [&](const char* what) { return std::string(k) + " " + what; };
            test_attention(nm("tiny prefill").c_str(), tiny, {{0, 40}, {16, 9}}, 1, mma);
            test_attention(nm("tiny decode split").c_str(), tiny, {{100, 1}, {3, 1}, {64, 1}}, 3, mma);
            test_attention(nm("smol prefill after prefix").c_str(), smol, {{32, 70}}, 1, mma);
            test_attention(nm("smol mixed split").c_str(), smol, {{150, 1}, {20, 23}}, 2, mma);
            test_attention(nm("llama decode split").c_str(), llama, {{200, 1}}, 4, mma);
            test_attention(nm("llama prefill").c_str(), llama, {{0, 33}, {48, 17}}, 1, mma);
        }
    }
    if (failures) {
        std::printf("%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("all kernel checks passed\n");
    return 0;
}
