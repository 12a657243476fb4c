//! Choosing which rows are worth paying an LLM for: representatives of the embedding space.
//!
//! [`representatives`] seeds `k` centres with k-means++ (each next centre drawn with
//! probability proportional to its squared distance from the chosen ones, so every region is
//! covered), refines them with a few Lloyd steps, and returns for each cluster its *medoid*:
//! the member nearest the centre. A medoid is a typical row of a dense region, never a lone
//! outlier, so the budget buys coverage rather than oddities. Near-duplicates of each other or
//! of rows chosen before (cosine above `near`) are never both chosen.
//!
//! Vectors are L2-normalised (the encoder's output), so cosine similarity is a dot product.
//! Pure computation over slices: no I/O, deterministic for a seed.

use rayon::prelude::*;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Row `i` of a flat `dim`-wide matrix.
fn row(v: &[f32], dim: usize, i: usize) -> &[f32] {
    &v[i * dim..(i + 1) * dim]
}

/// Up to `k` representatives among `candidates` (indices into `vectors`, `dim` wide), none
/// within cosine `near` of each other or of `chosen` (flat vectors already paid for).
pub fn representatives(
    vectors: &[f32],
    dim: usize,
    candidates: &[usize],
    k: usize,
    chosen: &[f32],
    near: f32,
    seed: u64,
) -> Vec<usize> {
    let n = candidates.len();
    if n == 0 || k == 0 {
        return Vec::new();
    }
    let k = k.min(n);
    let mut rng = fastrand::Rng::with_seed(seed);
    let cand = |j: usize| row(vectors, dim, candidates[j]);
    // k-means++ seeding over the candidates.
    let mut centres: Vec<f32> = Vec::with_capacity(k * dim);
    let first = rng.usize(0..n);
    centres.extend_from_slice(cand(first));
    let mut d2: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|j| (2.0 - 2.0 * dot(cand(j), cand(first))).max(0.0))
        .collect();
    while centres.len() / dim < k {
        let total: f64 = d2.iter().map(|&x| x as f64).sum();
        let pick = if total <= 0.0 {
            rng.usize(0..n)
        } else {
            let mut r = rng.f64() * total;
            let mut p = n - 1;
            for (j, &x) in d2.iter().enumerate() {
                r -= x as f64;
                if r <= 0.0 {
                    p = j;
                    break;
                }
            }
            p
        };
        let c = cand(pick).to_vec();
        d2.par_iter_mut().enumerate().for_each(|(j, x)| {
            *x = x.min((2.0 - 2.0 * dot(cand(j), &c)).max(0.0));
        });
        centres.extend_from_slice(&c);
    }
    // A few Lloyd steps: centres move to the middle of their members.
    let mut assign = vec![0usize; n];
    for step in 0..3 {
        assign = (0..n)
            .into_par_iter()
            .map(|j| nearest(cand(j), &centres, dim).0)
            .collect();
        if step == 2 {
            break;
        }
        let mut sums = vec![0f32; k * dim];
        let mut counts = vec![0usize; k];
        for (j, &c) in assign.iter().enumerate() {
            counts[c] += 1;
            for (s, x) in sums[c * dim..(c + 1) * dim].iter_mut().zip(cand(j)) {
                *s += x;
            }
        }
        for c in 0..k {
            if counts[c] == 0 {
                continue; // keeps its seed
            }
            let s = &mut sums[c * dim..(c + 1) * dim];
            let norm = s.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            for (dst, x) in centres[c * dim..(c + 1) * dim].iter_mut().zip(s.iter()) {
                *dst = x / norm;
            }
        }
    }
    // Each cluster's medoid: its member nearest the centre.
    let mut best: Vec<Option<(f32, usize)>> = vec![None; k];
    for (j, &c) in assign.iter().enumerate() {
        let s = dot(cand(j), row(&centres, dim, c));
        if best[c].is_none_or(|(b, _)| s > b) {
            best[c] = Some((s, j));
        }
    }
    // Large clusters first: when near-duplicates clash, the denser region keeps its pick.
    let mut counts = vec![0usize; k];
    for &c in &assign {
        counts[c] += 1;
    }
    // A cluster of one is an outlier: with more than two candidates per centre it is left out
    // (the budget buys typical rows; an outlier the index cannot place escalates later anyway).
    let min_members = if n > 2 * k { 2 } else { 1 };
    let mut order: Vec<usize> = (0..k)
        .filter(|&c| best[c].is_some() && counts[c] >= min_members)
        .collect();
    order.sort_by_key(|&c| std::cmp::Reverse(counts[c]));
    let mut out: Vec<usize> = Vec::with_capacity(k);
    let mut taken: Vec<f32> = Vec::with_capacity(k * dim);
    for c in order {
        let (_, j) = best[c].expect("filtered");
        let v = cand(j);
        let dup = |m: &[f32]| m.chunks(dim).any(|u| dot(u, v) > near);
        if dup(chosen) || dup(&taken) {
            continue;
        }
        taken.extend_from_slice(v);
        out.push(candidates[j]);
    }
    // Fewer than asked (near-duplicates, outliers left out): top up with the most typical of
    // the remaining members, so the budget is spent.
    if out.len() < k {
        let mut rest: Vec<(f32, usize)> = (0..n)
            .filter(|&j| counts[assign[j]] >= min_members)
            .map(|j| (dot(cand(j), row(&centres, dim, assign[j])), j))
            .collect();
        rest.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut have: std::collections::HashSet<usize> = out.iter().copied().collect();
        for (_, j) in rest {
            if out.len() >= k {
                break;
            }
            if have.contains(&candidates[j]) {
                continue;
            }
            let v = cand(j);
            let dup = |m: &[f32]| m.chunks(dim).any(|u| dot(u, v) > near);
            if dup(chosen) || dup(&taken) {
                continue;
            }
            taken.extend_from_slice(v);
            have.insert(candidates[j]);
            out.push(candidates[j]);
        }
    }
    out
}

/// Index and similarity of the centre nearest `v`.
fn nearest(v: &[f32], centres: &[f32], dim: usize) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    for (c, u) in centres.chunks(dim).enumerate() {
        let s = dot(v, u);
        if s > best.1 {
            best = (c, s);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// Three tight clusters of 50 (one of them 150 copies dense) and one far outlier.
    fn data() -> (Vec<f32>, usize) {
        let mut rng = fastrand::Rng::with_seed(1);
        let centres = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let mut v = Vec::new();
        for (c, n) in centres.iter().zip([150, 50, 50]) {
            for _ in 0..n {
                let p: Vec<f32> = c.iter().map(|x| x + 0.05 * (rng.f32() - 0.5)).collect();
                v.extend(unit(&p));
            }
        }
        v.extend(unit(&[-1.0, -1.0, -1.0]));
        (v, 3)
    }

    #[test]
    fn one_medoid_per_region_and_no_duplicates() {
        let (v, dim) = data();
        let n = v.len() / dim;
        let all: Vec<usize> = (0..n).collect();
        let region = |i: usize| {
            let r = row(&v, dim, i);
            (0..3).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap()
        };
        // Four centres: every region is covered, and if one lands on the outlier its cluster
        // of one is left out.
        let picked = representatives(&v, dim, &all, 4, &[], 0.999, 7);
        assert!(!picked.contains(&(n - 1)), "the outlier was bought");
        let mut regions: Vec<usize> = picked.iter().map(|&i| region(i)).collect();
        regions.sort();
        regions.dedup();
        assert_eq!(regions, vec![0, 1, 2], "{picked:?}");
        // Rows near what was already chosen are not chosen again.
        let chosen: Vec<f32> = row(&v, dim, picked[0]).to_vec();
        let again = representatives(&v, dim, &all, 4, &chosen, 0.9, 7);
        assert!(again.iter().all(|&i| dot(row(&v, dim, i), &chosen) <= 0.9));
        // Deterministic for a seed; never more than asked or than there are.
        assert_eq!(picked, representatives(&v, dim, &all, 4, &[], 0.999, 7));
        assert!(representatives(&v, dim, &all[..2], 5, &[], 0.999, 7).len() <= 2);
        assert!(representatives(&v, dim, &[], 5, &[], 0.999, 7).is_empty());
    }
}
