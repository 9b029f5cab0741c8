/* Fused per-tile front-to-back compositing of projected Gaussians (forward and backward), float32.
 *
 * The CPU kernel of the "native" splatting backend (headkit/render/gaussians_native.py, which
 * compiles this file on first use and calls it through ctypes). Same image formation as the
 * torch compositing of headkit/render/gaussians_torch.py and gsplat's rasterize_to_pixels:
 *
 *   power_k(p) = log o_k - sigma_k(p),  sigma = (a dx^2 + c dy^2) / 2 + b dx dy,
 *                (dx, dy) = (mx - px, my - py), p = (px, py) the pixel centre
 *   alpha_k    = min(0.999, exp(power_k)); pairs with alpha_k < 1/255 are skipped
 *   T_k        = prod_{j<k} (1 - alpha_j) over the applied pairs; the first pair with
 *                T_k (1 - alpha_k) <= 1e-4 and all pairs behind it are not applied
 *   out_p      = sum_k alpha_k T_k f_k
 *
 * Inputs: rows of attrs [R, 6] = (mx, my, a, b, c, log o) and feats [R, F]; the (Gaussian, tile)
 * pairs as pair_rows [P] (a row per pair), sorted by tile then depth, tile t owning pairs
 * tile_start[t] .. tile_start[t + 1] - 1. Tile t = (cam * tiles_y + ty) * tiles_x + tx covers
 * pixels [tx s, tx s + s) x [ty s, ty s + s) of camera cam (s = tile_size), clipped to the image.
 *
 * Loop order: per tile, pairs outside (front to back; back to front in the backward) and the
 * tile's pixels inside, restricted to the rows where the pair can reach alpha >= 1/255
 * (pair_span) and written without branches (0/1 factors) so that the compiler vectorises the
 * pixel loops (SSE2, and AVX2 where the CPU has it: the hot loops are compiled for both and
 * picked at load time; no fused multiply-add, so both give the same bits). Per-pixel state
 * (transmittance, stopped or not, the last applied pair) lives in small per-thread arrays. A
 * tile stops early once all its pixels have stopped. exp is a polynomial (Cephes' expf:
 * relative error < 2e-7, like libm's) because libm's expf does not vectorise without
 * -ffast-math. Sums over a tile's pixels use 8 fixed partial sums (vectorisable without
 * reassociation, so the result is the same on every machine and build).
 *
 * Tiles run in parallel (OpenMP). The forward writes only its own tile's pixels; the backward
 * writes gradients per pair (each pair belongs to one tile), so there are no races and the
 * result does not depend on the number of threads; the caller sums pair gradients per row.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

#define ALPHA_MIN (1.0f / 255.0f)
#define ALPHA_MAX 0.999f
#define T_MIN 1e-4f
#define LANES 8 /* partial sums of a reduction over pixels; tile_px is a multiple */
#define LN_255 5.54126354f

typedef struct {
    int64_t C, H, W, F, tile_size, tiles_x, tiles_y, tile_px; /* tile_px: s * s padded to LANES */
} Layout;

/* Per-thread work arrays, each tile_px long unless noted. */
typedef struct {
    float *xs, *ys;         /* pixel centres (x, y) */
    float *T;               /* transmittance in front of the current pair */
    float *live;            /* 1: the pixel has not stopped, 0: stopped (or outside the image) */
    int32_t *used;          /* index of the last applied pair + 1 */
    float *w, *fg, *behind; /* alpha T; f . dL/dout; sum_{j>k} alpha_j T_j f_j . dL/dout */
    float *acc;             /* [F, tile_px] output (forward) or dL/dout (backward), F-major */
    float *terms;           /* [6, tile_px] per-pixel terms of d L / d(mx, my, a, b, c, log o) */
    float *pairs;           /* [max_pairs, 6] the tile's pair attributes, gathered */
    float *block;           /* the allocation holding all of the above */
} Scratch;

static int scratch_alloc(Scratch *S, const Layout *L, int64_t max_pairs) {
    int64_t n = L->tile_px;
    S->block = malloc((size_t)(n * (8 + L->F + 6) + 6 * max_pairs + 8) * sizeof(float));
    if (S->block == NULL) return 1;
    float *p = S->block;
    S->xs = p; p += n;
    S->ys = p; p += n;
    S->T = p; p += n;
    S->live = p; p += n;
    S->used = (int32_t *)p; p += n;
    S->w = p; p += n;
    S->fg = p; p += n;
    S->behind = p; p += n;
    S->acc = p; p += n * L->F;
    S->terms = p; p += 6 * n;
    S->pairs = p;
    return 0;
}

/* exp(x) for x <= 0 (x is clamped to [-20, 0]: callers only need exp(x) >= 1/255 exactly).
 * Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, times 2^n. */
static inline float exp_neg(float x) {
    x = x < -20.0f ? -20.0f : (x > 0.0f ? 0.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    float y = q * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* A pair's attributes, loaded into locals (so the compiler sees they do not alias the stores). */
typedef struct {
    float mx, my, a, b, c, log_o;
} Pair;

static inline Pair load_pair(const float *q) {
    Pair g = {q[0], q[1], q[2], q[3], q[4], q[5]};
    return g;
}

/* alpha of pair g at the pixel centre (x, y), 0 where skipped (alpha < 1/255). */
static inline float pair_alpha(Pair g, float x, float y) {
    float dx = g.mx - x, dy = g.my - y;
    float power = g.log_o - (0.5f * (g.a * dx * dx + g.c * dy * dy) + g.b * dx * dy);
    float alpha = exp_neg(power);
    alpha = alpha < ALPHA_MAX ? alpha : ALPHA_MAX;
    return alpha < ALPHA_MIN ? 0.0f : alpha;
}

/* Sum of v[0 .. n) in LANES fixed partial sums (v[j] goes to partial sum j % LANES). */
static inline float lane_sum(const float *restrict v, int64_t n) {
    float part[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) part[l] += v[j + l];
    for (int l = 0; j + l < n; l++) part[l] += v[j + l];
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += part[l];
    return total;
}

/* The pixels [*p0, *p1) of the tile's rows where pair g may reach alpha >= 1/255 (the tile
 * starts at image row y0, s rows of s pixels). alpha >= 1/255 needs sigma <= log o + ln 255 =
 * k, which bounds |y - my| by sqrt(2 k Sigma_yy), Sigma_yy = a / (a c - b^2) the 2D covariance
 * entry; kept 0.1% + 0.01 px wider against rounding. Degenerate conics get the whole tile. */
static void pair_span(Pair g, int64_t y0, int64_t s, int64_t *p0, int64_t *p1) {
    float k = g.log_o + LN_255, det = g.a * g.c - g.b * g.b, lo = 0.0f, hi = (float)s;
    if (k <= 0.0f) {
        hi = 0.0f;
    } else if (det > 0.0f && g.a > 0.0f) {
        float ext = sqrtf(2.0f * k * g.a / det) * 1.001f + 0.01f;
        float centre = g.my - 0.5f - (float)y0; /* row r has its centres at y0 + r + 0.5 */
        lo = fmaxf(lo, ceilf(centre - ext));
        hi = fminf(hi, floorf(centre + ext) + 1.0f);
        hi = fmaxf(hi, lo);
    }
    *p0 = (int64_t)lo * s;
    *p1 = (int64_t)hi * s;
}

/* acc[p] += w[p] fc for p < n. */
VECTOR_CLONES
static void add_scaled(int64_t n, const float *restrict w, float fc, float *restrict acc) {
    for (int64_t p = 0; p < n; p++) acc[p] += w[p] * fc;
}

/* fg[p] = sum_c f[c] g[c stride + p] for p < n: a pair's features dotted with dL/dout. */
VECTOR_CLONES
static void dot_features(int64_t n, int64_t F, const float *restrict f, const float *restrict g,
                         int64_t stride, float *restrict fg) {
    for (int64_t p = 0; p < n; p++) fg[p] = 0.0f;
    for (int64_t c = 0; c < F; c++) {
        float fc = f[c];
        for (int64_t p = 0; p < n; p++) fg[p] += fc * g[c * stride + p];
    }
}

/* out[p] = w[p] g[p] for p < n. */
VECTOR_CLONES
static void multiply(int64_t n, const float *restrict w, const float *restrict g,
                     float *restrict out) {
    for (int64_t p = 0; p < n; p++) out[p] = w[p] * g[p];
}

/* Tile coordinates; pixel centres into S->xs, S->ys; 1 in S->live for pixels in the image. */
static void tile_pixels(const Layout *L, int64_t tile, Scratch *S, int64_t *cam, int64_t *x0,
                        int64_t *y0) {
    int64_t per_cam = L->tiles_x * L->tiles_y, s = L->tile_size;
    *cam = tile / per_cam;
    *y0 = (tile % per_cam) / L->tiles_x * s;
    *x0 = tile % L->tiles_x * s;
    for (int64_t p = 0; p < L->tile_px; p++) {
        int64_t x = *x0 + p % s, y = *y0 + p / s;
        S->xs[p] = (float)x + 0.5f;
        S->ys[p] = (float)y + 0.5f;
        S->live[p] = (p < s * s && x < L->W && y < L->H) ? 1.0f : 0.0f;
    }
}

static void gather_pairs(const float *attrs, const int64_t *rows, int64_t k, float *out) {
    for (int64_t i = 0; i < k; i++) memcpy(out + 6 * i, attrs + 6 * rows[i], 6 * sizeof(float));
}

/* One pair applied to the n pixels of a tile (forward): alpha, the stop rule, T and the
 * weights w = alpha T; used = index + 1 where applied. 0/1 factors instead of branches (exact
 * in float) so that the loop vectorises; restrict parameters rule out aliasing. */
VECTOR_CLONES
static void forward_pair(int64_t n, Pair g, int32_t index, const float *restrict xs,
                         const float *restrict ys, float *restrict T, float *restrict live,
                         float *restrict w, int32_t *restrict used) {
    for (int64_t p = 0; p < n; p++) {
        float t = T[p], alpha = pair_alpha(g, xs[p], ys[p]) * live[p];
        float keep = t * (1.0f - alpha) <= T_MIN ? 0.0f : 1.0f; /* 0: stop before this pair */
        alpha = alpha * keep;
        live[p] = live[p] * keep;
        w[p] = alpha * t;
        T[p] = t * (1.0f - alpha); /* unchanged where alpha == 0 */
        used[p] = alpha > 0.0f ? index : used[p];
    }
}

/* One pair, back to front, at the n pixels of a tile (backward; formulas at backward_tile):
 * T goes from T_{k+1} to T_k, behind gains w_k (f_k . g); w receives alpha_k T_k and t_* the
 * per-pixel terms of dL/d(mx, my, a, b, c, log o) (six arrays, so they provably do not alias).
 * fg: f_k . g per pixel. */
VECTOR_CLONES
static void backward_pair(int64_t n, Pair q, int32_t index, const float *restrict xs,
                          const float *restrict ys, const int32_t *restrict used,
                          const float *restrict fg, float *restrict T, float *restrict behind,
                          float *restrict w, float *restrict t_mx, float *restrict t_my,
                          float *restrict t_a, float *restrict t_b, float *restrict t_c,
                          float *restrict t_log_o) {
    for (int64_t p = 0; p < n; p++) {
        float dx = q.mx - xs[p], dy = q.my - ys[p];
        float applied = index < used[p] ? 1.0f : 0.0f; /* 0/1 factors, as in forward_pair */
        float alpha = pair_alpha(q, xs[p], ys[p]) * applied;
        float inv = 1.0f / (1.0f - alpha);
        float Tk = T[p] * inv;
        float wk = alpha * Tk;
        float d_alpha = Tk * fg[p] - behind[p] * inv;
        behind[p] += wk * fg[p];
        T[p] = Tk;
        w[p] = wk;
        float d_power = alpha * d_alpha * (alpha < ALPHA_MAX ? 1.0f : 0.0f);
        t_mx[p] = -d_power * (q.a * dx + q.b * dy);
        t_my[p] = -d_power * (q.b * dx + q.c * dy);
        t_a[p] = -0.5f * d_power * dx * dx;
        t_b[p] = -d_power * dx * dy;
        t_c[p] = -0.5f * d_power * dy * dy;
        t_log_o[p] = d_power;
    }
}

/* Forward of one tile: pairs front to back, all pixels of the tile per pair. */
static void forward_tile(const Layout *L, int64_t tile, const float *attrs, const float *feats,
                         const int64_t *tile_start, const int64_t *pair_rows, Scratch *S,
                         float *out, float *final_t, int32_t *n_used) {
    int64_t cam, x0, y0, n = L->tile_px, F = L->F, s = L->tile_size;
    tile_pixels(L, tile, S, &cam, &x0, &y0);
    int64_t start = tile_start[tile], k = tile_start[tile + 1] - start;
    const int64_t *rows = pair_rows + start;
    gather_pairs(attrs, rows, k, S->pairs);
    float *T = S->T, *live = S->live, *w = S->w, *acc = S->acc;
    int32_t *used = S->used;
    for (int64_t p = 0; p < n; p++) {
        T[p] = 1.0f;
        used[p] = 0;
    }
    memset(acc, 0, (size_t)(n * F) * sizeof(float));
    for (int64_t i = 0; i < k; i++) {
        int64_t p0, p1;
        Pair g = load_pair(S->pairs + 6 * i);
        if (i % 8 == 7 && lane_sum(live, n) == 0.0f) break; /* every pixel has stopped */
        pair_span(g, y0, s, &p0, &p1);
        if (p1 <= p0) continue;
        forward_pair(p1 - p0, g, (int32_t)(i + 1), S->xs + p0, S->ys + p0, T + p0, live + p0,
                     w + p0, used + p0);
        const float *f = feats + rows[i] * F;
        for (int64_t c = 0; c < F; c++) add_scaled(p1 - p0, w + p0, f[c], acc + c * n + p0);
    }
    for (int64_t p = 0; p < s * s; p++) {
        int64_t x = x0 + p % s, y = y0 + p / s;
        if (x >= L->W || y >= L->H) continue;
        int64_t pix = (cam * L->H + y) * L->W + x;
        for (int64_t c = 0; c < F; c++) out[pix * F + c] = acc[c * n + p];
        final_t[pix] = T[p];
        n_used[pix] = used[p];
    }
}

/* Backward of one tile: pairs back to front from the last one any pixel applied. Per pixel,
 * with g = dL/dout_p and T_k = T_{k+1} / (1 - alpha_k) recovered from the final transmittance:
 *   dL/df_k     += alpha_k T_k g
 *   dL/dalpha_k  = T_k (f_k . g) - (sum_{j>k} alpha_j T_j f_j . g) / (1 - alpha_k)
 *   dL/dpower_k  = alpha_k dL/dalpha_k   (0 where alpha was clamped at 0.999)
 *   d power / d (mx, my, a, b, c, log o) = (-(a dx + b dy), -(b dx + c dy), -dx^2/2, -dx dy,
 *                                           -dy^2/2, 1)
 * summed over the tile's pixels into the pair's row of grad_pair_attrs / grad_pair_feats. */
static void backward_tile(const Layout *L, int64_t tile, const float *attrs, const float *feats,
                          const int64_t *tile_start, const int64_t *pair_rows, Scratch *S,
                          const float *final_t, const int32_t *n_used, const float *grad_out,
                          float *grad_pair_attrs, float *grad_pair_feats) {
    int64_t cam, x0, y0, n = L->tile_px, F = L->F, s = L->tile_size, last = 0;
    int64_t start = tile_start[tile], k = tile_start[tile + 1] - start;
    if (k == 0) return;
    tile_pixels(L, tile, S, &cam, &x0, &y0);
    const int64_t *rows = pair_rows + start;
    gather_pairs(attrs, rows, k, S->pairs);
    float *T = S->T, *w = S->w, *fg = S->fg, *g = S->acc, *behind = S->behind, *terms = S->terms;
    int32_t *used = S->used;
    for (int64_t p = 0; p < n; p++) {
        int64_t pix = (cam * L->H + y0 + p / s) * L->W + x0 + p % s;
        int inside = S->live[p] != 0.0f;
        T[p] = inside ? final_t[pix] : 1.0f;
        used[p] = inside ? n_used[pix] : 0;
        behind[p] = 0.0f;
        for (int64_t c = 0; c < F; c++) g[c * n + p] = inside ? grad_out[pix * F + c] : 0.0f;
        last = used[p] > last ? used[p] : last;
    }
    for (int64_t i = last - 1; i >= 0; i--) {
        int64_t p0, p1;
        Pair q = load_pair(S->pairs + 6 * i);
        pair_span(q, y0, s, &p0, &p1);
        if (p1 <= p0) continue;
        int64_t m = p1 - p0;
        dot_features(m, F, feats + rows[i] * F, g + p0, n, fg + p0);
        backward_pair(m, q, (int32_t)i, S->xs + p0, S->ys + p0, used + p0, fg + p0, T + p0,
                      behind + p0, w + p0, terms + p0, terms + n + p0, terms + 2 * n + p0,
                      terms + 3 * n + p0, terms + 4 * n + p0, terms + 5 * n + p0);
        float *ga = grad_pair_attrs + 6 * (start + i), *gf = grad_pair_feats + F * (start + i);
        for (int j = 0; j < 6; j++) ga[j] = lane_sum(terms + j * n + p0, m);
        for (int64_t c = 0; c < F; c++) {
            multiply(m, w + p0, g + c * n + p0, fg + p0);
            gf[c] = lane_sum(fg + p0, m);
        }
    }
}

static Layout make_layout(int64_t C, int64_t H, int64_t W, int64_t F, int64_t tile_size) {
    Layout L = {C, H, W, F, tile_size, (W + tile_size - 1) / tile_size,
                (H + tile_size - 1) / tile_size, 0};
    L.tile_px = (tile_size * tile_size + LANES - 1) / LANES * LANES;
    return L;
}

/* Forward of all tiles into out [C, H, W, F] (every pixel written), final_t [C, H, W] (the
 * transmittance after the last applied pair) and n_used [C, H, W] (that pair's index in its
 * tile + 1; 0: none applied). Returns 0, or 1 when a work buffer cannot be allocated. */
int composite_forward(const float *attrs, const float *feats, const int64_t *tile_start,
                      const int64_t *pair_rows, int64_t C, int64_t H, int64_t W, int64_t F,
                      int64_t tile_size, int64_t max_pairs, float *out, float *final_t,
                      int32_t *n_used, int n_threads) {
    Layout L = make_layout(C, H, W, F, tile_size);
    int64_t n_tiles = C * L.tiles_x * L.tiles_y;
    int failed = 0;
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        Scratch S;
        int ok = scratch_alloc(&S, &L, max_pairs) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (ok)
                forward_tile(&L, t, attrs, feats, tile_start, pair_rows, &S, out, final_t, n_used);
        }
        if (ok) free(S.block);
    }
    return failed;
}

/* Backward of all tiles: per-pair gradients grad_pair_attrs [P, 6] and grad_pair_feats [P, F]
 * from grad_out [C, H, W, F] and the forward's final_t and n_used (rows of pairs no pixel
 * applied are left as they are: pass zeros). Returns 0, or 1 when a work buffer cannot be
 * allocated. */
int composite_backward(const float *attrs, const float *feats, const int64_t *tile_start,
                       const int64_t *pair_rows, int64_t C, int64_t H, int64_t W, int64_t F,
                       int64_t tile_size, int64_t max_pairs, const float *final_t,
                       const int32_t *n_used, const float *grad_out, float *grad_pair_attrs,
                       float *grad_pair_feats, int n_threads) {
    Layout L = make_layout(C, H, W, F, tile_size);
    int64_t n_tiles = C * L.tiles_x * L.tiles_y;
    int failed = 0;
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        Scratch S;
        int ok = scratch_alloc(&S, &L, max_pairs) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (ok)
                backward_tile(&L, t, attrs, feats, tile_start, pair_rows, &S, final_t, n_used,
                              grad_out, grad_pair_attrs, grad_pair_feats);
        }
        if (ok) free(S.block);
    }
    return failed;
}
